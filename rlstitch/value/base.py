"""The value-estimator interface: embed, value and value_and_grad on noisy latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_latent(z: Tensor, t: Tensor | float, channels: int, name: str) -> Tensor:
    """Validate a noisy latent batch and its time; returns t as a [B] float tensor."""
    if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != channels:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{name}: latent must be [B, {channels}, H, W], got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"{name}: latent must be floating point, got {z.dtype}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name}: latent contains NaN or Inf")
    t = torch.as_tensor(t, dtype=torch.float32, device=z.device)
    t = t.expand(z.shape[0]) if t.dim() == 0 else t
    if t.shape != (z.shape[0],):
        raise ValueError(f"{name}: t must be a scalar or shape [{z.shape[0]}], got {tuple(t.shape)}")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{name}: t must lie in [0, 1], got {t.tolist()}")
    return t


def check_prompts(prompts: Sequence[str] | None, n: int, name: str) -> None:
    """None, or one prompt per latent of the batch."""
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{name}: got {len(prompts)} prompts for a batch of {n} latents")


class ValueEstimator(nn.Module):
    """V(z_t, t, prompts) ~ E[r(D(z0)) | z_t]. Subclasses implement `embed` (or override `value`)."""

    name = "value"
    latent_channels = 4

    def __init__(self, reward: nn.Module):
        super().__init__()
        self.reward = reward

    def embed(self, z: Tensor, t: Tensor) -> Tensor:
        """Reward-space image embedding of a noisy latent."""
        raise NotImplementedError

    def value(self, z: Tensor, t: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        """Value per latent [B]."""
        t = check_latent(z, t, self.latent_channels, self.name)
        check_prompts(prompts, z.shape[0], self.name)
        return self.reward.score_embedding(self.embed(z, t), prompts)

    def value_and_grad(self, z: Tensor, t: Tensor | float, prompts: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """Value [B] and its gradient with respect to z (same shape as z)."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            v = self.value(z, t, prompts)
            (g,) = torch.autograd.grad(v.sum(), z)
        return v.detach(), g
