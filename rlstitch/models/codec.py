"""LatentCodec: a diffusers AutoencoderKL with its family's scaling and shift factors."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LatentCodec(nn.Module):
    """encode: image [-1, 1] -> model latent (z - shift) * scale; decode: the inverse through the decoder."""

    def __init__(self, vae: nn.Module, name: str = ""):
        super().__init__()
        self.vae = vae
        self.name = name or "vae"
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent."""
        return self.vae.config.latent_channels

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _inputs(self, x: Tensor, what: str) -> Tensor:
        """x checked for NaN/Inf (meta tensors hold no values) and moved to the VAE's device."""
        if x.device.type != "meta" and not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: {what} NaN or Inf")
        return x.to(next(self.vae.parameters()).device)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (posterior mean unless sample=True)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B, 3, H, W], got {tuple(images.shape)}")
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(self._inputs(images, "images contain").to(dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return ((z - self.shift) * self.scale).float()

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (not clamped, so gradients pass)."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name}: latent must be [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        dtype = next(self.vae.parameters()).dtype
        z = self._inputs(z, "latent contains")
        return self.vae.decode((z / self.scale + self.shift).to(dtype)).sample.float()
