"""The tiny-world build runs end to end for a few steps and writes loadable models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


def test_build_few_steps(tmp_path, monkeypatch):
    from rlstitch.models.registry import load_backbone, load_codec, load_reward
    from rlstitch.tinyworld.build import STAGES, BuildConfig, build

    cfg = BuildConfig(out=str(tmp_path), scale=0.002, threads=1)
    trained = build(cfg)
    assert set(trained) == set(STAGES)
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
    # The generators' text encoder is the finished CLIP's text tower, stored apart from the reward.
    prompts = ["a red circle left of a blue square"]
    assert torch.equal(bb.encode_prompts(prompts).pooled, load_reward("tiny-clip").text_condition(prompts).pooled)
    assert not any(k.startswith("visual.") for k in load_file(tmp_path / "text_encoder" / "model.safetensors"))


def test_build_rejects_unknown_stage(tmp_path):
    from rlstitch.tinyworld.build import BuildConfig, build

    with pytest.raises(ValueError, match="unknown build stage.*clip_text"):
        build(BuildConfig(out=str(tmp_path), scale=0.002, threads=1), {"clip_text"})


def test_model_saves_never_leave_half_a_file(tmp_path):
    """A save that dies midway keeps the previous weights intact and leaves no temporary folder behind."""
    from diffusers import AutoencoderKL

    from rlstitch.tinyworld import models as tm
    from rlstitch.tinyworld.build import save_pretrained

    vae = tm.build("vae", seed=0)
    save_pretrained(vae, tmp_path / "vae")
    before = {f.name: f.read_bytes() for f in (tmp_path / "vae").iterdir()}
    assert "diffusion_pytorch_model.safetensors" in before and "config.json" in before

    class Dies:
        def save_pretrained(self, folder, safe_serialization):
            (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_pretrained(Dies(), tmp_path / "vae")
    assert {f.name: f.read_bytes() for f in (tmp_path / "vae").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae", use_safetensors=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
