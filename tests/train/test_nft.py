"""DiffusionNFT: optimality probabilities, bridge coefficients and the loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlstitch.sampling.flow import forward_noise
from rlstitch.train.nft import (
    bridge,
    bridge_point,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    sample_train_times,
)


def test_optimality_probability_by_hand():
    # groups (1, 2) and (3, 4): advantages -+0.5; global population std sqrt(1.25)
    r = optimality_probability(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=2)
    a = 0.5 / (math.sqrt(1.25) + 1e-4)
    want = torch.tensor([0.5 - a / 10, 0.5 + a / 10, 0.5 - a / 10, 0.5 + a / 10])
    torch.testing.assert_close(r, want, atol=1e-7, rtol=0)


def test_optimality_probability_clips_and_matches_spec_form():
    # 128 groups of 2; only the last differs, by more than 5 global std: clipped to r~ = 1 and 0
    rewards = torch.zeros(256)
    rewards[-1] = 10.0
    r = optimality_probability(rewards, group_size=2, adv_clip_max=5.0)
    assert float(r[-1]) == 1.0 and float(r[-2]) == 0.0 and torch.all(r[:-2] == 0.5)
    # SPEC form: r~ = 1/2 + 1/2 clip(r_norm, -1, 1) with Z = adv_clip_max * (std + eps)
    rewards = torch.randn(24, generator=torch.Generator().manual_seed(0))
    r = optimality_probability(rewards, group_size=6, adv_clip_max=2.0)
    z = 2.0 * (rewards.double().std(unbiased=False) + 1e-4)
    mean = rewards.view(4, 6).mean(1, keepdim=True).expand(4, 6).flatten()
    spec = 0.5 + 0.5 * ((rewards - mean) / z).clamp(-1, 1)
    torch.testing.assert_close(r, spec.float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="groups of 5"):
        optimality_probability(rewards, group_size=5)


def test_bridge_coefficients_by_hand():
    a, s, da, ds = bridge(torch.tensor([0.75]), torch.tensor([0.5]))
    # a = 0.25/0.5; s = sqrt(0.75^2 - 0.5^2 0.5^2); a' = -1/(1-tau); s' = (t - a a' tau^2)/s
    torch.testing.assert_close(a, torch.tensor([0.5]))
    torch.testing.assert_close(s, torch.tensor([math.sqrt(0.5)]))
    torch.testing.assert_close(da, torch.tensor([-2.0]))
    torch.testing.assert_close(ds, torch.tensor([1.0 / math.sqrt(0.5)]))


def test_bridge_at_tau_zero_is_the_forward_path():
    t = torch.tensor([0.1, 0.5, 0.9])
    a, s, da, ds = bridge(t, torch.zeros(3))
    torch.testing.assert_close(a, 1 - t)
    torch.testing.assert_close(s, t)
    torch.testing.assert_close(da, -torch.ones(3))
    torch.testing.assert_close(ds, torch.ones(3))
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    z_t, u = bridge_point(z0, torch.zeros(3), t, eps)
    torch.testing.assert_close(z_t, forward_noise(z0, t, eps))
    torch.testing.assert_close(u, eps - z0)


def test_bridge_marginal_and_derivatives():
    tau = torch.tensor([0.2, 0.48, 0.7], dtype=torch.float64)
    t = torch.tensor([0.5, 0.9, 0.95], dtype=torch.float64)
    a, s, da, ds = bridge(t, tau)
    # noise level of z_t = a z_tau + s eps is t when z_tau has noise level tau
    torch.testing.assert_close(a**2 * tau**2 + s**2, t**2)
    h = 1e-6
    a2, s2, _, _ = bridge(t + h, tau)
    a1, s1, _, _ = bridge(t - h, tau)
    torch.testing.assert_close(da, (a2 - a1) / (2 * h), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ds, (s2 - s1) / (2 * h), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="tau < t"):
        bridge(torch.tensor([0.3]), torch.tensor([0.3]))


def test_train_times_lie_between_tau_and_one():
    tau = torch.tensor([0.0, 0.3, 0.6] * 100)
    t = sample_train_times(tau, torch.Generator().manual_seed(0))
    assert bool((t > tau).all()) and bool((t <= 1).all())


def test_nft_loss_by_hand():
    z_t = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([0.5])
    u = torch.tensor([[2.0, -2.0]])  # x0 target = z_t - t u = (0, 1)
    v_theta = torch.tensor([[1.0, 1.0]], requires_grad=True)
    v_old = torch.tensor([[0.5, 0.0]])
    v_ref = torch.tensor([[0.0, 0.0]])
    r = torch.tensor([0.8])
    out = nft_loss(v_theta, v_old, v_ref, z_t, t, u, r, beta=1.0, adv_clip_max=5.0, kl_weight=1e-4)
    # v+ = v_theta: x0+ = (0.5, -0.5), err (0.5, -1.5), weight 1.0 -> L+ = 1.25
    # v- = 2 v_old - v_theta = (0, -1): x0- = (1, 0.5), err (1, -0.5), weight 0.75 -> L- = 0.625 / 0.75
    lp, ln = 1.25, 0.625 / 0.75
    policy = 5.0 * (0.8 * lp + 0.2 * ln)
    assert float(out.positive) == pytest.approx(lp)
    assert float(out.negative) == pytest.approx(ln)
    assert float(out.policy_loss) == pytest.approx(policy)
    assert float(out.kl) == pytest.approx(1.0)
    assert float(out.loss.detach()) == pytest.approx(policy + 1e-4)
    out.loss.backward()
    # gradient with the adaptive weights held constant: d/dv of mean(err^2)/w, err+ = -t dv, err- = +t dv
    ep, en = torch.tensor([0.5, -1.5]), torch.tensor([1.0, -0.5])
    g = 5.0 * (0.8 * (2 * ep * -0.5) / 2 / 1.0 + 0.2 * (2 * en * 0.5) / 2 / 0.75) + 1e-4 * 2 * torch.tensor([1.0, 1.0]) / 2
    torch.testing.assert_close(v_theta.grad[0], g)


def test_nft_loss_beta_mixing_and_float32():
    z_t = torch.tensor([[1.0, 0.0]], dtype=torch.bfloat16)
    t, u = torch.tensor([0.5]), torch.tensor([[2.0, -2.0]])
    v_theta, v_old = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16), torch.tensor([[0.5, 0.0]])
    out = nft_loss(v_theta, v_old, v_old, z_t, t, u, torch.tensor([1.0]), beta=0.5, adv_clip_max=5.0, kl_weight=0.0)
    # v+ = 0.5 v_old + 0.5 v_theta = (0.75, 0.5): x0+ = (0.625, -0.25), err (0.625, -1.25), w 0.9375
    lp = (0.625**2 + 1.25**2) / 2 / 0.9375
    assert out.loss.dtype == torch.float32
    assert float(out.loss) == pytest.approx(5.0 * lp / 0.5, rel=1e-6)


def test_nft_loss_prefers_the_target_when_optimal():
    z_t, t, u = torch.randn(4, 4, 2, 2), torch.full((4,), 0.6), torch.randn(4, 4, 2, 2)
    v_old = u + 0.3 * torch.randn_like(u)
    good = nft_loss(u, v_old, v_old, z_t, t, u, torch.ones(4)).loss
    bad = nft_loss(u + 0.5, v_old, v_old, z_t, t, u, torch.ones(4)).loss
    assert float(good) < float(bad)


def test_old_policy_decay_schedule():
    assert old_policy_decay(0) == 0.0
    assert old_policy_decay(100) == pytest.approx(0.1)
    assert old_policy_decay(10_000) == 0.5
    assert old_policy_decay(30, rate=0.01, max_decay=0.2) == pytest.approx(0.2)


def test_tweedie_target_is_the_clean_sample_for_the_exact_velocity():
    from rlstitch.train.nft import tweedie_x0

    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    tau = torch.tensor([0.0, 0.4, 0.7])
    z_tau = forward_noise(x0, tau, eps)
    torch.testing.assert_close(tweedie_x0(z_tau, tau, eps - x0), x0)  # with the true velocity eps - x0
    # the loss regresses on the given x0 exactly as on a velocity target u with z_t - t u = x0
    v, z_t = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, r = torch.tensor([0.5, 0.6, 0.8]), torch.tensor([1.0, 0.0, 0.5])
    u = (z_t - x0) / t.view(-1, 1, 1, 1)
    given = nft_loss(v, v * 0.9, v, z_t, t, torch.zeros_like(v), r, x0=x0)
    torch.testing.assert_close(given.loss, nft_loss(v, v * 0.9, v, z_t, t, u, r).loss)
