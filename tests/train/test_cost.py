"""Compute accounting: the cost table's profiles, pricing of counted work, and the learner's counted forwards."""

from __future__ import annotations

import json

import pytest

from rlstitch.config import load_config
from rlstitch.train.config import RecipeConfig
from rlstitch.train.cost import (
    OPS,
    CostModel,
    add_work,
    cost_table,
    latent_tokens,
    load_table,
    models_for,
    split_op,
)


def test_committed_table_prices_every_op_of_every_profile():
    table = load_table()
    for name, prof in {**table["profiles"], **table["tiny_cpu"]}.items():
        assert set(prof["ops"]) == set(OPS), name
        for op, spec in prof["ops"].items():
            vals = [spec["s"]] if "s" in spec else list(spec["by_cut"].values())
            assert all(v >= 0 for v in vals), (name, op)
    for name in table["profiles"]:  # the H200 measurements say where they come from
        assert all("source" in spec for spec in table["profiles"][name]["ops"].values()), name


def test_projection_scales_with_tokens_and_maps_the_cut_by_depth():
    table = load_table()
    sd = table["profiles"]["sd35-medium"]["ops"]
    m = models_for("tiny-sd3", latent_tokens("tiny-sd3", 8))
    gpu = m["gpu_s"]
    assert gpu.profile == "sd35-medium" and gpu.scale == pytest.approx(1024 / 4096)
    assert gpu.op_seconds("denoiser_fwd") == pytest.approx(sd["denoiser_fwd"]["s"] / 4)
    # tiny cut 3 of 8 blocks = SD3.5-M block 9 of 24: between the measured cuts 8 and 12
    v8, v12 = sd["value_fwd"]["by_cut"]["8"], sd["value_fwd"]["by_cut"]["12"]
    assert gpu.op_seconds("value_fwd/i=3") == pytest.approx((v8 + (v12 - v8) / 4) / 4)
    assert m["cpu_s"].op_seconds("decode") == pytest.approx(table["tiny_cpu"]["tiny-sd3"]["ops"]["decode"]["s"])
    real = models_for("sd35-medium", latent_tokens("sd35-medium", 64))  # 512 px: 32x32 tokens
    assert set(real) == {"gpu_s"} and real["gpu_s"].scale == pytest.approx(0.25)
    with pytest.raises(KeyError, match="no cost profile"):
        models_for("qwen-image", 1024)


def test_pricing_and_bad_ops():
    model = CostModel("p", {"denoiser_fwd": {"s": 0.5}, "value_fwd": {"by_cut": {"2": 1.0, "4": 3.0}}}, scale=2.0)
    assert model.seconds({"denoiser_fwd": 3, "value_fwd/i=3": 1}) == {"denoiser_fwd": 3.0, "value_fwd/i=3": 4.0}
    assert model.total({"denoiser_fwd": 3, "value_fwd/i=3": 1}) == 7.0
    with pytest.raises(KeyError, match="needs a cut"):
        model.op_seconds("value_fwd")
    with pytest.raises(KeyError, match="unknown work op"):
        split_op("teleport")
    total = add_work(add_work(__import__("collections").Counter(), {"denoiser_fwd": 2}), {"denoiser_fwd": 3})
    assert total["denoiser_fwd"] == 5
    assert "total" in cost_table(total, {"gpu_s": model})


def test_corrupt_table_names_the_file(tmp_path):
    f = tmp_path / "t.json"
    f.write_text("{not json")
    with pytest.raises(ValueError, match="t.json"):
        load_table(f)
    f.write_text(json.dumps({"profiles": {}, "projections": {}}))
    with pytest.raises(KeyError):
        models_for("tiny-sd3", 64, load_table(f))


@pytest.mark.parametrize("target", ["bridge", "tweedie"])
def test_learner_counts_its_forwards_and_backwards(target):
    from test_learner import SMALL, make, nft_batch

    cfg = load_config(RecipeConfig, SMALL + [f"nft.target={target}", "nft.timesteps_per_sample=2"])
    learner = make(cfg)
    stats = learner.update(nft_batch(0))
    # 4 samples x 2 training times: theta (with grad), old, ref; tweedie: + one old forward per sample at z_tau
    assert stats["work/denoiser_bwd"] == 8
    assert stats["work/denoiser_fwd"] == 24 + (4 if target == "tweedie" else 0)
