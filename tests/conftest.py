"""Shared fixtures: tiny randomly initialised models of the real architectures, one thread per process."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = ["a", "red", "blue", "circle", "square", "left", "of"]


@pytest.fixture(scope="session")
def tiny_clip_reward():
    """A random-weight tiny open_clip CLIP wrapped as a ClipReward."""
    from rlstitch.models.reward import ClipReward
    from rlstitch.models.tokenizer import WordTokenizer
    from rlstitch.tinyworld import models as tm

    clip = tm.build("clip", WORDS, seed=0).eval()
    cfg = tm.clip_config(WORDS)
    return ClipReward(clip, WordTokenizer(WORDS, cfg["text_cfg"]["context_length"]), mean=cfg["mean"], std=cfg["std"])


@pytest.fixture(scope="session", params=["sd3", "flux"])
def random_backbone(request, tiny_clip_reward):
    """A random-weight tiny SD3 or FLUX backbone conditioned on the tiny CLIP text tower."""
    from rlstitch.models import FluxBackbone, SD3Backbone
    from rlstitch.tinyworld import models as tm

    model = tm.build(request.param, seed=1).eval()
    if request.param == "sd3":
        return SD3Backbone(model, tiny_clip_reward.text_condition, name="rand-sd3")
    return FluxBackbone(model, tiny_clip_reward.text_condition, name="rand-flux", pack=1)


@pytest.fixture(scope="session")
def random_world(tmp_path_factory):
    """A complete tiny world of randomly initialised models in a temp folder, used via $RLSTITCH_TINY_DIR."""
    import json

    from rlstitch.data import scenes as data
    from rlstitch.io import atomic_save
    from rlstitch.models.registry import save_tiny_clip
    from rlstitch.models.reward import AestheticMLP
    from rlstitch.models.tokenizer import WordTokenizer
    from rlstitch.tinyworld import models as tm

    root = tmp_path_factory.mktemp("world")
    words = sorted({w for c in (data.sample(i).caption for i in range(300)) for w in WordTokenizer([]).split(c)})
    clip = tm.build("clip", words, seed=0)
    save_tiny_clip(clip, tm.clip_config(words), root / "clip")
    save_tiny_clip(clip, tm.clip_config(words), root / "text_encoder", text_only=True)
    tm.build("vae", seed=0).save_pretrained(root / "vae")
    for kind in ("sd3", "flux"):
        tm.build(kind, seed=0).save_pretrained(root / kind)
    (root / "aesthetic").mkdir()
    atomic_save(AestheticMLP(tm.CLIP_EMBED, tm.aesthetic_hidden()).state_dict(), root / "aesthetic" / "model.safetensors")
    (root / "aesthetic" / "config.json").write_text(json.dumps({"clip": "tiny-clip", "hidden": tm.aesthetic_hidden()}))
    old = os.environ.get("RLSTITCH_TINY_DIR")
    os.environ["RLSTITCH_TINY_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("RLSTITCH_TINY_DIR", None)
    else:
        os.environ["RLSTITCH_TINY_DIR"] = old


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (dashboard off, loopback only), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()
