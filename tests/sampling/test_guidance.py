"""DPS guidance: the drift it adds (c_t = -3t/(1-t) at nu = 2), clipping, scale 0, and both value models."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from rlstitch.models.condition import Condition
from rlstitch.sampling.flow import FlowSampler
from rlstitch.sampling.guidance import dps_hook, dps_sample, drift_coeff, velocity_coeff
from rlstitch.value.base import ValueEstimator


class LinearValue(ValueEstimator):
    """V(z) = <w, z>: its gradient is w everywhere."""

    name = "linear"

    def __init__(self, w: Tensor):
        super().__init__(nn.Identity())
        self.w = w

    def value(self, z: Tensor, t, prompts=None) -> Tensor:
        """Linear value per latent."""
        return (z * self.w).flatten(1).sum(1)


class PullBackbone:
    """Velocity of a point mass at 0, conditioning ignored."""

    latent_channels = 4

    def encode_prompts(self, prompts) -> Condition:
        """Zero conditions."""
        return Condition(torch.zeros(len(prompts), 1, 1), torch.zeros(len(prompts), 1))

    def null_condition(self) -> Condition:
        """Zeros."""
        return Condition(torch.zeros(1, 1, 1), torch.zeros(1, 1))

    def velocity(self, z: Tensor, t, cond=None) -> Tensor:
        """v = z / t (eps - z0 with z0 = 0)."""
        return z / max(float(t), 1e-3)


class SliceCodec:
    """First three latent channels as the image."""

    def decode(self, z: Tensor) -> Tensor:
        """Differentiable slice."""
        return z[:, :3]


def test_coefficients_and_clipping():
    assert velocity_coeff(0.5) == pytest.approx(1.0)
    assert velocity_coeff(0.75) == pytest.approx(3.0)
    assert velocity_coeff(1.0, max_coeff=7.0) == 7.0  # clipped instead of infinite
    assert drift_coeff(0.5) == pytest.approx(-3.0)  # SPEC: c_t = -3t/(1-t) at nu^2 = 4t/(1-t)
    assert drift_coeff(0.75, noise_level=0.0) == pytest.approx(-3.0)  # ODE: only the velocity part
    with pytest.raises(ValueError, match="max_coeff"):
        velocity_coeff(0.5, max_coeff=0)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_one_step_mean_shift_is_ct_scale_grad_dt(t):
    # Same step noise with and without guidance: the difference is exactly the change of the step's mean.
    torch.manual_seed(0)
    w = torch.randn(1, 4, 8, 8, dtype=torch.float64)  # float64: the shift is O(dt), far below float32 noise
    z = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    v = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    sampler, scale, dt = FlowSampler(sde=True, noise_level=2.0), 0.7, 1e-5
    guided_v = dps_hook(LinearValue(w), None, scale)(0, t, t - dt, z, v)
    a = sampler.step(z, guided_v, t, t - dt, torch.Generator().manual_seed(1))
    b = sampler.step(z, v, t, t - dt, torch.Generator().manual_seed(1))
    expected = drift_coeff(t) * scale * w * (-dt)  # drift c_t * scale * grad V integrated over dt (t decreasing)
    torch.testing.assert_close(a - b, expected.expand_as(a), rtol=1e-3, atol=1e-12)
    assert float(((a - b) * w).sum()) > 0  # the step moves up the value


def test_scale_zero_is_the_unguided_sampler():
    from rlstitch.sampling.generate import generate

    bb, codec = PullBackbone(), SliceCodec()
    sampler = FlowSampler(steps=6, sde=True)
    out = dps_sample(bb, codec, LinearValue(torch.ones(1, 4, 8, 8)), ["a", "b"], scale=0.0, sampler=sampler,
                     cfg_scale=1.0, seeds=[3, 4], decode=False)
    ref = generate(bb, codec, ["a", "b"], sampler=sampler, cfg_scale=1.0, seeds=[3, 4], decode=False)
    torch.testing.assert_close(out.latents, ref, atol=0, rtol=0)
    assert out.trace == []


def test_guidance_raises_the_value_and_is_seeded():
    bb, codec, w = PullBackbone(), SliceCodec(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vm = LinearValue(w)
    sampler = FlowSampler(steps=8, sde=True)
    kw = dict(sampler=sampler, cfg_scale=1.0, seeds=[0, 1, 2], max_coeff=5.0)
    base = dps_sample(bb, codec, vm, ["a"] * 3, scale=0.0, **kw)
    guided = dps_sample(bb, codec, vm, ["a"] * 3, scale=0.5, **kw)
    again = dps_sample(bb, codec, vm, ["a"] * 3, scale=0.5, **kw)
    assert bool((vm.value(guided.latents, 0.0) > vm.value(base.latents, 0.0)).all())
    torch.testing.assert_close(guided.latents, again.latents, atol=0, rtol=0)
    assert [k for k, _, _ in guided.trace] == list(range(8)) and guided.images.shape == (3, 3, 8, 8)


def test_hook_accepts_a_grad_function():
    calls = []

    def grad_fn(z, t, prompts):
        calls.append((tuple(z.shape), t, prompts))
        return torch.zeros(len(z)), torch.ones_like(z)

    v = torch.zeros(2, 4, 8, 8)
    out = dps_hook(grad_fn, ["x", "y"], scale=2.0)(0, 0.5, 0.4, torch.zeros(2, 4, 8, 8), v)
    torch.testing.assert_close(out, torch.full_like(v, -2.0))  # -(t/(1-t)) * scale * grad = -1 * 2 * 1
    assert calls == [((2, 4, 8, 8), 0.5, ["x", "y"])]


def test_tweedie_and_stitchvm_gradients_reach_the_latent(random_backbone, tiny_clip_reward):
    """Both estimators give a finite, non-zero guidance change; the frozen models get no gradients."""
    from rlstitch.models.codec import LatentCodec
    from rlstitch.stitch.layer import StitchLayer
    from rlstitch.stitch.vm import StitchVM
    from rlstitch.tinyworld import models as tm
    from rlstitch.value.estimators import Tweedie

    codec = LatentCodec(tm.build("vae", seed=0).eval().requires_grad_(False))
    layer = StitchLayer(random_backbone.hidden_dim, tiny_clip_reward.width, (8, 8), tiny_clip_reward.grid)
    prompts = ["a red circle", "a blue square"]
    z, v = torch.randn(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    for vm in (Tweedie(random_backbone, codec, tiny_clip_reward), StitchVM(random_backbone, tiny_clip_reward, layer, 2, 1)):
        with torch.no_grad():  # as in dps_sample: the hook must enable gradients itself
            dv = dps_hook(vm.eval(), prompts, scale=1.0)(0, 0.5, 0.45, z, v)
        assert dv.shape == z.shape and torch.isfinite(dv).all() and dv.abs().sum() > 0 and not dv.requires_grad
        assert all(p.grad is None for p in random_backbone.parameters())
