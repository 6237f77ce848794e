"""The real-architecture cost benchmark on the tiny world's shapes (random weights): its figures and its errors."""

import json

import pytest


@pytest.mark.slow
def test_tiny_preset_reports_every_estimator_and_cut(tmp_path):
    import value_cost

    out = tmp_path / "cost.json"
    res = value_cost.main(["--preset", "tiny", "--reward", "tiny", "--cuts", "2,8", "--batch", "2", "--repeats", "1",
                           "--device", "cpu", "--dps-steps", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["dit_blocks"] == 8 and res["latent"] == [2, 4, 8, 8] and res["cfg_ms"] > 0
    shallow, deep, tweedie = res["stitchvm"]["2"], res["stitchvm"]["8"], res["tweedie"]
    for c in (shallow, deep, tweedie):
        assert c["value_ms"] > 0 and c["grad_ms"] > 0 and c["grad_peak_mb"] > 0
    # a deeper cut holds more DiT blocks; Tweedie holds the whole DiT, the VAE and the reward model
    assert shallow["weights_mb"] < deep["weights_mb"] < tweedie["weights_mb"]
    # backward through 2 DiT blocks + tail keeps less than backward through DiT + decoder + reward
    assert shallow["grad_peak_mb"] < tweedie["grad_peak_mb"]
    # whole DPS samples: the guided ones cost more than the unguided sampler, StitchVM's guidance less than Tweedie's
    assert res["dps_steps"] == 2 and set(res["dps"]) == {"flow", "tweedie", "stitchvm i=2", "stitchvm i=8"}
    dps = res["dps"]
    assert all(d["sec_per_sample"] > 0 for d in dps.values())
    assert dps["flow"]["peak_mb"] < dps["stitchvm i=2"]["peak_mb"] < dps["tweedie"]["peak_mb"]


def test_cut_outside_the_dit_is_named(tmp_path):
    import value_cost

    with pytest.raises(ValueError, match=r"cut 9 is outside the DiT's 1..8 blocks"):
        value_cost.main(["--cuts", "9", "--batch", "1", "--repeats", "1", "--device", "cpu"])
