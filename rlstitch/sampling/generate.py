"""Text-to-image generation: classifier-free-guided velocity, sampling, decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rlstitch.models.condition import Condition
from rlstitch.models.device import model_device
from rlstitch.sampling.flow import SDE_SEED_OFFSET, FlowSampler, VelocityHook, generators, randn


def cfg_velocity(backbone, cond: Condition, scale: float) -> Callable[[Tensor, float], Tensor]:
    """v = v_null + scale (v_cond - v_null), both halves in one batched call (scale 1: conditional only)."""
    null = backbone.null_condition()

    def velocity(z: Tensor, t: float) -> Tensor:
        if scale == 1.0:
            return backbone.velocity(z, t, cond)
        both = Condition.cat([cond, null.expand(z.shape[0])])
        v_c, v_u = backbone.velocity(torch.cat([z, z]), t, both).chunk(2)
        return v_u + scale * (v_c - v_u)

    return velocity


def initial_noise(backbone, n: int, latent_hw: tuple[int, int], seeds: Sequence[int]) -> Tensor:
    """z_1 ~ N(0, I), one generator per sample so a sample's noise does not depend on its batch."""
    return randn((n, backbone.latent_channels, *latent_hw), generators(seeds))


def generate(backbone, codec, prompts: Sequence[str], *, sampler: FlowSampler | None = None, cfg_scale: float = 4.0,
             seeds: Sequence[int] | None = None, latent_hw: tuple[int, int] = (8, 8), hook: VelocityHook | None = None,
             decode: bool = True) -> Tensor:
    """Images in [-1, 1] (or final latents with decode=False) for the prompts."""
    sampler = sampler or FlowSampler(steps=20)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    z = initial_noise(backbone, len(prompts), latent_hw, seeds).to(model_device(backbone))
    gens = generators(seeds, SDE_SEED_OFFSET) if sampler.sde else None
    with torch.no_grad() if hook is None else torch.enable_grad():
        out = sampler.sample(cfg_velocity(backbone, backbone.encode_prompts(prompts), cfg_scale), z,
                             generator=gens, hook=hook).z
    if not decode:
        return out.detach()
    with torch.no_grad():
        return codec.decode(out.detach()).clamp(-1, 1)
