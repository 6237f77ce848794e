"""The stitch build's steps keep every tensor on the models' device (a GPU in use; 'meta' stands in for it here)."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="module")
def meta_models(tiny_clip_reward):
    """The tiny CLIP reward and a random tiny VAE on the meta device, and a VAE-stitch prefix (no parameters)."""
    from rlstitch.models.codec import LatentCodec
    from rlstitch.stitch.vm import LatentTokens
    from rlstitch.tinyworld import models as tm

    codec = LatentCodec(tm.build("vae", seed=0).eval().requires_grad_(False), name="rand-vae")
    return copy.deepcopy(tiny_clip_reward).to("meta"), codec.to("meta"), LatentTokens(4)


def test_collect_stats_runs_on_the_images_device(meta_models, monkeypatch):
    """Images and the noise drawn on the CPU from the batch seed join the reward's device; so do the features."""
    from rlstitch.stitch import collect
    from rlstitch.stitch.stats import StitchStats

    reward, codec, prefix = meta_models
    seen = []
    monkeypatch.setattr(StitchStats, "update", lambda self, fu, fr, cls: seen.append(
        {fu[1].device.type, *(f.device.type for f in fr.values()), *(c.device.type for c in cls.values())}))
    images = torch.zeros(3, 3, 32, 32)  # CPU images (the tiny-world stream) join the reward's device
    collect.collect_stats(prefix, reward, codec, [(7, images), (8, images.to("meta"))], j_max=1, latent_hw=(8, 8),
                          progress=False)
    assert seen == [{"meta"}, {"meta"}]


def test_teacher_targets_and_finetune_loss_on_the_reward_device(meta_models):
    """CPU images are moved chunk by chunk to the teacher's device; a VAE-stitch student's loss stays there."""
    from rlstitch.stitch.finetune import FinetuneConfig, batch_loss, teacher_targets
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.vm import StitchVM

    reward, codec, prefix = meta_models
    tgt = teacher_targets(reward, codec, torch.zeros(5, 3, 32, 32), chunk=2)
    assert {tgt.z0.device.type, tgt.emb.device.type, tgt.tokens.device.type} == {"meta"}
    assert tgt.z0.shape == (5, 4, 8, 8) and len(tgt.emb) == 5
    student = StitchVM(prefix, reward, StitchLayer(4, reward.width, (8, 8), reward.grid), i=1, j=0)
    loss = batch_loss(student, reward, tgt, FinetuneConfig(), torch.Generator().manual_seed(0), batch=4)
    assert loss.device.type == "meta" and loss.dim() == 0


def test_device_knobs_are_checked():
    """A misspelt device or cuda on a machine without one fails at start-up, naming the knob."""
    from rlstitch.models.registry import resolve_device
    from rlstitch.stitch.build import StitchBuildConfig

    with pytest.raises(ValueError, match="device='gpu'"):
        StitchBuildConfig(device="gpu").validate()
    with pytest.raises(ValueError, match="--device='tpu'"):
        resolve_device("tpu", "--device")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no GPU"):
            resolve_device("cuda")
