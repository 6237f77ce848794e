"""The inference-alignment benchmark end to end on two prompts: its JSON keys and its evaluation counts."""

import json

import pytest


@pytest.mark.slow
def test_quick_run_reports_every_figure_with_counted_evaluations(tmp_path, monkeypatch):
    monkeypatch.delenv("RLSTITCH_TINY_DIR", raising=False)  # the committed tiny world, even after random_world
    import inference_alignment as bench

    out = tmp_path / "inf.json"
    bench.main(["--quick", "--prompts", "2", "--scales", "1.0", "--json", str(out)])
    res = json.loads(out.read_text())
    for m in ("flow", "tweedie", "stitchvm"):
        assert set(res["dps"][m]) >= {"reward", "sec_per_sample", "peak_mb", "scale"}
        assert res["dps"][m]["sec_per_sample"] > 0 and res["dps"][m]["peak_mb"] > 0
        per_prompt = res["dps"][m]["per_prompt"]  # the mean and its standard error come from these
        assert len(per_prompt) == 2 and res["dps"][m]["reward"] == pytest.approx(sum(per_prompt) / 2, abs=1e-5)
        assert res["dps"][m]["reward_se"] == pytest.approx(abs(per_prompt[0] - per_prompt[1]) / 2, abs=1e-5)
    assert res["dps"]["flow"]["timed_runs"] == 3 and res["dps"]["stitchvm"]["timed_runs"] == 1
    assert [(p["N"], p["M"]) for p in res["fks"]["tweedie"]] == [(n, 1) for n in bench.TWEEDIE_N]
    assert [(p["N"], p["M"]) for p in res["fks"]["stitchvm"]] == list(bench.STITCH_NM)
    steps, fk_defaults = bench.QUICK["steps"], bench.fk.FKConfig()
    resamples = len(bench.fk.resample_steps(steps, bench.QUICK["resample_every"], fk_defaults.window_start,
                                            fk_defaults.window_end))
    for p in res["fks"]["tweedie"]:  # CFG velocity (2 per particle-step) + Tweedie values (3 nets) + final decode/reward
        assert p["nfe"] == p["N"] * (2 * steps + 3 * resamples + 2)
    assert [(p["N"], p["M"]) for p in res["fks"]["stitchvm_m1"]] == [(n, 1) for n in bench.STITCH_M1_N]
    for p in res["fks"]["stitchvm_m1"]:  # one StitchVM call per particle and resampling step
        assert p["evals"]["stitchvm"] == p["N"] * resamples and p["nfe"] == p["N"] * (2 * steps + resamples + 2)
    for p in res["fks"]["bon"]:  # no values at all
        assert p["nfe"] == p["N"] * (2 * steps + 2)
    ratio = res["fks_match_compute_ratio"]
    assert ratio is None or ratio > 0
    assert (tmp_path / "inf.png").stat().st_size > 1000
