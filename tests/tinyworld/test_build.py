"""The tiny-world build runs end to end for a few steps and writes loadable models."""

from __future__ import annotations

import json

import torch


def test_build_few_steps(tmp_path, monkeypatch):
    from rlstitch.models.registry import load_backbone, load_codec, load_reward
    from rlstitch.tinyworld.build import BuildConfig, build

    cfg = BuildConfig(out=str(tmp_path), scale=0.002, threads=1)
    trained = build(cfg)
    assert set(trained) == {"vae", "vae_decoder", "clip", "clip_image", "aesthetic", "sd3", "flux"}
    for name in trained:
        info = json.loads((tmp_path / name / "training.json").read_text())
        assert info["steps"] >= 2 and info["seconds"] > 0
    monkeypatch.setenv("RLSTITCH_TINY_DIR", str(tmp_path))
    codec = load_codec("tiny-vae")
    assert 0.1 < codec.scale < 100  # latents rescaled towards unit variance
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert load_reward("tiny-aesthetic").score(x).shape == (2,)
    bb = load_backbone("tiny-flux")
    with torch.no_grad():
        assert bb.velocity(codec.encode(x), 0.5, bb.encode_prompts(["a red circle", "a blue square"])).shape == (2, 4, 8, 8)
