"""LatentCodec: inputs join the VAE's device and dtype; bad latents and images raise clear errors."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="module")
def codec():
    from rlstitch.models.codec import LatentCodec
    from rlstitch.tinyworld import models as tm

    return LatentCodec(tm.build("vae", seed=0).eval().requires_grad_(False), name="rand-vae")


def test_cpu_inputs_join_the_vae_device(codec):
    """CPU images and latents are moved to the VAE's device (a GPU in use; 'meta' here)."""
    meta = copy.deepcopy(codec).to("meta")
    with torch.no_grad():
        z = meta.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
        x = meta.decode(torch.randn(2, 4, 8, 8))
    assert z.device.type == x.device.type == "meta" and z.shape == (2, 4, 8, 8) and x.shape == (2, 3, 32, 32)


def test_non_finite_inputs_raise(codec):
    z = torch.randn(1, 4, 8, 8)
    z[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="rand-vae: latent contains NaN or Inf"):
        codec.decode(z)
    with pytest.raises(ValueError, match="rand-vae: images contain NaN or Inf"):
        codec.encode(torch.full((1, 3, 32, 32), float("inf")))
    with pytest.raises(ValueError, match=r"latent must be \[B, 4, h, w\]"):
        codec.decode(torch.randn(1, 3, 8, 8))


def test_round_trip_is_finite_and_float32(codec):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        rec = codec.decode(codec.encode(x))
    assert rec.dtype == torch.float32 and rec.shape == x.shape and torch.isfinite(rec).all()
