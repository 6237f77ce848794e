"""Recipe fixtures: a random-weight world with a (randomly initialised) StitchVM artifact for tiny-flux/sd3."""

from __future__ import annotations

import os

import pytest

# Ray workers that import torch on a busy 2-core machine can need more than Ray's 60 s to register.
os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")


def random_stitch(backbone_name: str, out, i: int = 2, j: int = 0, seed: int = 0):
    """Save a StitchVM artifact with a randomly initialised stitch for the current tiny world (no fit)."""
    import torch

    from rlstitch.models.registry import load_backbone, load_reward
    from rlstitch.stitch import artifact
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.vm import StitchVM

    torch.manual_seed(seed)
    backbone, reward = load_backbone(backbone_name), load_reward("tiny-clip")
    layer = StitchLayer(backbone.hidden_dim, reward.width, backbone.grid((8, 8)), reward.grid)
    return artifact.save(StitchVM(backbone, reward, layer, i, j), out)


@pytest.fixture(scope="session")
def random_stitches(random_world):
    """{backbone name: artifact folder} for tiny-flux and tiny-sd3 on the random world."""
    return {name: str(random_stitch(name, random_world / "stitchvm" / name)) for name in ("tiny-flux", "tiny-sd3")}
