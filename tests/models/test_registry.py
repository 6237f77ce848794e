"""Registry: tiny models saved to a folder load back by name; missing weights raise the clear error."""

from __future__ import annotations

import json

import pytest
import torch


def test_tiny_models_round_trip(tmp_path, tiny_clip_reward):
    from rlstitch.models.registry import load_backbone, load_codec, load_reward, save_tiny_clip
    from rlstitch.tinyworld import models as tm
    from tests.conftest import WORDS

    save_tiny_clip(tiny_clip_reward.clip, tm.clip_config(WORDS), tmp_path / "clip")
    vae = tm.build("vae", seed=3)
    vae.save_pretrained(tmp_path / "vae")
    sd3 = tm.build("sd3", seed=4)
    sd3.save_pretrained(tmp_path / "sd3")

    reward = load_reward("tiny-clip", path=str(tmp_path / "clip"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(reward.embed_image(x), tiny_clip_reward.embed_image(x))
    codec = load_codec("tiny-vae", path=str(tmp_path / "vae"))
    assert codec.encode(x).shape == (2, 4, 8, 8)
    bb = load_backbone("tiny-sd3", path=str(tmp_path / "sd3"), with_text=False)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(bb.model(z, torch.zeros(1, 1, 64), torch.zeros(1, 64), torch.tensor([500.0]))[0],
                                   sd3.eval()(z, torch.zeros(1, 1, 64), torch.zeros(1, 64), torch.tensor([500.0]))[0])
    assert not any(p.requires_grad for p in bb.parameters())


def test_missing_weights_name_what_to_download(tmp_path):
    from rlstitch.models.registry import WeightsNotFoundError, load_backbone, load_codec, load_reward

    with pytest.raises(WeightsNotFoundError, match="sd35-medium.*stabilityai/stable-diffusion-3.5-medium"):
        load_backbone("sd35-medium", path=str(tmp_path), with_text=False)
    with pytest.raises(WeightsNotFoundError, match="hpsv2.*HPSv2"):
        load_reward("hpsv2", path=str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="aesthetic"):
        load_reward("aesthetic")
    with pytest.raises(WeightsNotFoundError, match="tiny-vae"):
        load_codec("tiny-vae", path=str(tmp_path / "nothing"))
    with pytest.raises(KeyError, match="unknown backbone"):
        load_backbone("sd4")


def test_a_corrupt_hub_folder_says_why_it_could_not_be_read(tmp_path):
    from rlstitch.models.registry import WeightsNotFoundError, load_backbone
    from rlstitch.tinyworld import models as tm

    tm.build("sd3", seed=0).save_pretrained(tmp_path / "transformer", safe_serialization=True)
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsNotFoundError, match=r"sd35-medium.*not found or unreadable at .*\(\w+Error: "):
        load_backbone("sd35-medium", path=str(tmp_path), with_text=False)


def test_mismatched_weights_fail(tmp_path, tiny_clip_reward):
    from rlstitch.models.registry import load_reward, save_tiny_clip
    from rlstitch.tinyworld import models as tm
    from tests.conftest import WORDS

    cfg = tm.clip_config(WORDS)
    save_tiny_clip(tiny_clip_reward.clip, cfg, tmp_path / "clip")
    cfg["vision_cfg"]["width"] = 96  # config says one architecture, weights hold another
    (tmp_path / "clip" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_reward("tiny-clip", path=str(tmp_path / "clip"))


def test_text_encoder_holds_only_the_text_tower(tmp_path, tiny_clip_reward):
    from rlstitch.models.registry import load_text_encoder, save_tiny_clip
    from rlstitch.tinyworld import models as tm
    from tests.conftest import WORDS

    save_tiny_clip(tiny_clip_reward.clip, tm.clip_config(WORDS), tmp_path / "te", text_only=True)
    prompts = ["a red circle", "a blue square above a green triangle"]
    enc = load_text_encoder("tiny-text", path=str(tmp_path / "te"))
    torch.testing.assert_close(enc.text_condition(prompts).pooled, tiny_clip_reward.text_condition(prompts).pooled)
    with pytest.raises(KeyError, match="unknown text encoder"):
        load_text_encoder("t5-xxl")
    # A full CLIP file whose config claims nothing is missing must not load a text-only file.
    save_tiny_clip(tiny_clip_reward.clip, tm.clip_config(WORDS), tmp_path / "clip")
    (tmp_path / "clip" / "model.safetensors").write_bytes((tmp_path / "te" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match its config.*visual"):
        load_text_encoder("tiny-text", path=str(tmp_path / "clip"))


def test_pickled_weights_are_never_loaded(tmp_path, monkeypatch):
    """A folder holding only a pickled .bin/.pt checkpoint is refused: torch.load is never called."""
    from rlstitch.models.registry import load_codec, load_reward
    from rlstitch.tinyworld import models as tm

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load called on a weights file")

    vae = tm.build("vae", seed=0)
    vae.save_pretrained(tmp_path / "tiny", safe_serialization=False)  # diffusion_pytorch_model.bin
    vae.save_pretrained(tmp_path / "hub" / "vae", safe_serialization=False)
    torch.save(vae.state_dict(), tmp_path / "hpsv2.pt")
    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(OSError, match="safetensors"):
        load_codec("tiny-vae", path=str(tmp_path / "tiny"))
    with pytest.raises(OSError, match="sd35-vae"):
        load_codec("sd35-vae", path=str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"hpsv2\.pt.*safetensors"):
        load_reward("hpsv2", path=str(tmp_path / "hpsv2.pt"))


def test_corrupt_or_missing_safetensors_name_the_file(tmp_path, tiny_clip_reward):
    from rlstitch.io import atomic_save
    from rlstitch.models.registry import (
        WeightsNotFoundError,
        load_aesthetic_head,
        load_reward,
        save_tiny_clip,
    )
    from rlstitch.tinyworld import models as tm
    from tests.conftest import WORDS

    save_tiny_clip(tiny_clip_reward.clip, tm.clip_config(WORDS), tmp_path / "clip")
    st = tmp_path / "clip" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=r"clip/model\.safetensors.*not a readable safetensors file"):
        load_reward("tiny-clip", path=str(tmp_path / "clip"))
    st.unlink()
    with pytest.raises(WeightsNotFoundError, match=r"clip/model\.safetensors"):
        load_reward("tiny-clip", path=str(tmp_path / "clip"))
    head = tmp_path / "head.safetensors"
    atomic_save({"w": torch.zeros(2)}, head)
    with pytest.raises(ValueError, match=r"head\.safetensors.*aesthetic MLP"):
        load_aesthetic_head(head, (16,))
    with pytest.raises(WeightsNotFoundError, match=r"nothing\.safetensors"):
        load_aesthetic_head(tmp_path / "nothing.safetensors", (16,))
