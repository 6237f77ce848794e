"""Flow samplers: time grid, stop at tau, Euler exactness, SDE step statistics, seeding."""

from __future__ import annotations

import pytest
import torch

from rlstitch.sampling.flow import FlowSampler, forward_noise, shift_time, time_grid, tweedie


def test_time_grid_and_shift():
    g = time_grid(4)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    s = time_grid(4, shift=3.0)
    assert s[0] == 1 and s[-1] == 0
    torch.testing.assert_close(s[2], torch.tensor(3 * 0.5 / (1 + 2 * 0.5), dtype=torch.float64))
    assert float(shift_time(torch.tensor(0.25), 1.0)) == 0.25


def test_stop_at_tau_returns_z_tau_and_times():
    torch.manual_seed(0)
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    # the exact velocity of a straight path: Euler lands on the path at every grid time
    sampler = FlowSampler(steps=10)
    out = sampler.sample(lambda z, t: eps - z0, eps.clone(), stop=4)
    assert out.timesteps.tolist() == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    torch.testing.assert_close(out.z, forward_noise(z0, 0.6, eps))
    rest = sampler.sample(lambda z, t: eps - z0, out.z, start=4)
    torch.testing.assert_close(rest.z, z0, atol=1e-5, rtol=0)
    torch.testing.assert_close(tweedie(out.z, 0.6, eps - z0), z0, atol=1e-5, rtol=0)


def test_hook_sees_each_step_and_can_change_velocity():
    seen = []

    def hook(k, t, t_next, z, v):
        seen.append((k, round(t, 3), round(t_next, 3)))
        return v * 0

    out = FlowSampler(steps=5).sample(lambda z, t: torch.ones_like(z), torch.zeros(1, 1, 2, 2), stop=3, hook=hook)
    assert seen == [(0, 1.0, 0.8), (1, 0.8, 0.6), (2, 0.6, 0.4)]
    assert out.z.abs().sum() == 0


def test_sde_step_mean_and_variance():
    # With the exact velocity of a point mass z0, the SDE step keeps z on the path's marginal:
    # mean (1-t')z0 + sqrt(t'^2 - s^2) eps_hat, plus fresh noise of variance s^2.
    sampler = FlowSampler(steps=10, sde=True, noise_level=2.0)
    z0 = torch.zeros(20000, 1)
    z = forward_noise(z0, 0.5, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)))
    v = (z - z0) / 0.5 - z0  # eps - z0 with eps = (z - (1-t) z0)/t
    nxt = sampler.step(z, v, 0.5, 0.4, torch.Generator().manual_seed(1))
    assert abs(float(nxt.std()) - 0.4) < 0.01  # marginal std of z_t is t for z0 = 0


def test_sde_seeding_is_per_row_and_batch_invariant():
    sampler = FlowSampler(steps=4, sde=True)
    vel = lambda z, t: -z  # noqa: E731
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    both = sampler.sample(vel, torch.ones(2, 1, 2, 2), generator=gens).z
    one = sampler.sample(vel, torch.ones(1, 1, 2, 2), generator=[torch.Generator().manual_seed(8)]).z
    torch.testing.assert_close(both[1:], one)


def test_bad_start_stop():
    with pytest.raises(ValueError, match="start <= stop"):
        FlowSampler(steps=4).sample(lambda z, t: z, torch.zeros(1), start=3, stop=2)


def test_time_grid_rejects_a_non_positive_shift():
    # shift 0 gives 0/0 = NaN at t=1, a negative shift a pole inside (0, 1): both must fail loudly
    for shift in (0.0, -1.0):
        with pytest.raises(ValueError, match="shift must be > 0"):
            time_grid(4, shift)


def test_generate_puts_the_initial_noise_on_the_model_device():
    from torch import nn

    from rlstitch.models.condition import Condition
    from rlstitch.sampling.generate import generate

    class MetaBackbone(nn.Module):
        """A backbone whose weights live on another device ('meta'): inputs elsewhere are an error."""

        latent_channels = 4

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, device="meta"))

        def encode_prompts(self, prompts):
            return Condition(torch.zeros(len(prompts), 1, 1), torch.zeros(len(prompts), 1))

        def null_condition(self):
            return Condition(torch.zeros(1, 1, 1), torch.zeros(1, 1))

        def velocity(self, z, t, cond=None):
            assert z.device == self.w.device, f"latent on {z.device}, model on {self.w.device}"
            return torch.zeros_like(z)

    for sde in (False, True):
        out = generate(MetaBackbone(), None, ["a", "b"], sampler=FlowSampler(steps=2, sde=sde), cfg_scale=1.0,
                       latent_hw=(2, 2), decode=False)
        assert out.device.type == "meta" and out.shape == (2, 4, 2, 2)
