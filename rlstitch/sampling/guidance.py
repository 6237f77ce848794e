"""DPS gradient guidance for flow models (SPEC §2): v_r = v + c_t grad_z V(z_t), c_t = -3t/(1-t) times a scale.

The hook works with any ValueEstimator: Tweedie backpropagates through denoiser + decoder + reward, StitchVM
through V only (DiT prefix + stitch + reward tail). A remote value (actor pool) plugs in as a `GradFn`.

Why the hook adds only c_t/3: FlowSampler's SDE step turns a velocity change dv into a drift change of
(1 + nu^2/2) dv, i.e. 3 dv at the SPEC's noise level nu = 2 (the score part of the reverse SDE plus the ODE part).
Adding dv = -t/(1-t) * scale * grad V (the velocity form of a score shift by scale * grad V) therefore gives the
principled drift v + c_t * scale * grad V. At the final Euler step (t_next = 0) the change is dv itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlstitch.models.device import model_device
from rlstitch.sampling.flow import SDE_SEED_OFFSET, FlowSampler, VelocityHook, generators
from rlstitch.sampling.generate import cfg_velocity, initial_noise

# grad_fn(z, t, prompts) -> (value [B], grad [B, C, H, W]) — a local estimator or a remote value pool.
GradFn = Callable[[Tensor, float, Sequence[str] | None], tuple[Tensor, Tensor]]


def velocity_coeff(t: float, max_coeff: float = 10.0) -> float:
    """t/(1-t), the velocity-form weight of a score shift, clipped at max_coeff (it diverges at t=1)."""
    if max_coeff <= 0:
        raise ValueError(f"max_coeff must be > 0, got {max_coeff}")
    return min(t / max(1.0 - t, 1e-12), max_coeff)


def drift_coeff(t: float, noise_level: float = 2.0, max_coeff: float = 10.0) -> float:
    """c_t of the SDE drift, -(1 + nu^2/2) t/(1-t) (SPEC: -3t/(1-t) at nu = 2), with t/(1-t) clipped."""
    return -(1.0 + noise_level**2 / 2.0) * velocity_coeff(t, max_coeff)


def local_grad_fn(value_model) -> GradFn:
    """value_and_grad of an in-process ValueEstimator."""
    return lambda z, t, prompts: value_model.value_and_grad(z, t, prompts)


def dps_hook(value_model, prompts: Sequence[str] | None, scale: float, max_coeff: float = 10.0,
             trace: list | None = None) -> VelocityHook:
    """A FlowSampler hook adding -(t/(1-t)) * scale * grad V to the velocity (see the module docstring).

    `value_model` is a ValueEstimator or a GradFn; `trace`, if given, receives (step, t, mean V) per step.
    """
    # Duck-typed, so sampling does not import the value layer that builds on it.
    grad_fn = local_grad_fn(value_model) if hasattr(value_model, "value_and_grad") else value_model
    prompts = None if prompts is None else list(prompts)

    def hook(k: int, t: float, t_next: float, z: Tensor, v: Tensor) -> Tensor:
        if scale == 0:
            return v
        val, grad = grad_fn(z.detach(), t, prompts)
        if trace is not None:
            trace.append((k, t, float(val.mean())))
        return v - velocity_coeff(t, max_coeff) * scale * grad.to(v.device, v.dtype)

    return hook


@dataclass
class DPSOutput:
    """Final latents and (if decoded) images in [-1, 1]."""

    latents: Tensor
    images: Tensor | None
    trace: list


def dps_sample(backbone, codec, value_model, prompts: Sequence[str], *, scale: float, sampler: FlowSampler | None = None,
               cfg_scale: float = 4.0, seeds: Sequence[int] | None = None, latent_hw: tuple[int, int] = (8, 8),
               max_coeff: float = 10.0, decode: bool = True) -> DPSOutput:
    """Guided SDE sampling of one latent per prompt; seeds fix the initial and the step noise per sample."""
    sampler = sampler or FlowSampler(steps=20, sde=True)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    z = initial_noise(backbone, len(prompts), latent_hw, seeds).to(model_device(backbone))
    # Same noise streams as rlstitch.sampling.generate, so scale=0 reproduces the unguided sampler exactly.
    gens = generators(seeds, SDE_SEED_OFFSET) if sampler.sde else None
    trace: list = []
    hook = dps_hook(value_model, prompts, scale, max_coeff, trace) if scale else None
    # The velocity runs without a graph; value_and_grad enables gradients only for V.
    with torch.no_grad():
        velocity = cfg_velocity(backbone, backbone.encode_prompts(prompts), cfg_scale)
        out = sampler.sample(velocity, z, generator=gens, hook=hook).z
        images = codec.decode(out).clamp(-1, 1) if decode else None
    return DPSOutput(latents=out, images=images, trace=trace)
