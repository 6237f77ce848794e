"""DiffusionNFT (SPEC §3): optimality probabilities, the beta-mixed implicit policies, the x0-space adaptive
loss of the official code, KL to the reference, the old-policy schedule, and the StitchVM bridge at z_tau.

Time convention: t=1 noise, t=0 clean. A rollout of the old policy stops at tau (tau=0: the clean sample,
the baseline). Training points for t > tau come from the Gaussian bridge anchored at z_tau:

    a = (1-t)/(1-tau),  s = sqrt(t^2 - a^2 tau^2),  z_t = a z_tau + s eps,  u = a' z_tau + s' eps

which has the forward path's marginal noise level t whenever z_tau does (a^2 tau^2 + s^2 = t^2); at tau=0
it is the usual z_t = (1-t) z0 + t eps with u = eps - z0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlstitch.sampling.flow import bcast


def optimality_probability(rewards: Tensor, group_size: int, adv_clip_max: float = 5.0, eps: float = 1e-4) -> Tensor:
    """Reward -> r~ in [0, 1] per sample (official code): advantage (r - mean of its prompt group) / (global std
    + eps), clipped to +-adv_clip_max, then / (2 adv_clip_max) + 1/2. Samples are ordered group by group."""
    r = rewards.double().flatten()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    adv = (r.view(-1, group_size) - r.view(-1, group_size).mean(1, keepdim=True)).flatten()
    std = r.std(unbiased=False)  # np.std (ddof=0) over the whole batch, as the official stat tracker
    adv = (adv / (std + eps)).clamp(-adv_clip_max, adv_clip_max)
    return (adv / adv_clip_max / 2 + 0.5).clamp(0, 1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def bridge(t: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Coefficients (a, s, da/dt, ds/dt) of z_t = a z_tau + s eps for t > tau (float64 inside for accuracy)."""
    t64, tau64 = t.double(), tau.double()
    if bool((t64 <= tau64).any()) or bool((tau64 >= 1).any()):
        raise ValueError("the bridge needs tau < t <= 1 for every sample")
    a = (1 - t64) / (1 - tau64)
    da = -1 / (1 - tau64)
    s = (t64.square() - a.square() * tau64.square()).clamp_min(0).sqrt()
    ds = (t64 - a * da * tau64.square()) / s  # d/dt sqrt(t^2 - a^2 tau^2) = (t - a a' tau^2) / s
    return tuple(x.to(t.dtype) for x in (a, s, da, ds))


def bridge_point(z_tau: Tensor, tau: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(z_t, target velocity u) on the bridge from z_tau (tau=0: forward path and eps - z0)."""
    a, s, da, ds = (bcast(c, z_tau) for c in bridge(t, tau))
    return a * z_tau + s * eps, da * z_tau + ds * eps


def sample_train_times(tau: Tensor, generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """t = tau + (1 - tau) * U(lo, hi) per sample: training times between the stop time and pure noise."""
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"nft.t_range must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
    u = lo + (hi - lo) * torch.rand(tau.shape, generator=generator, dtype=torch.float64)
    t = tau.double() + (1 - tau.double()) * u
    # t = tau exactly has an infinite s'; keep a margin of 1e-3 of the remaining interval.
    return torch.maximum(t, tau.double() + 1e-3 * (1 - tau.double())).to(torch.float32)


def _weighted_x0_mse(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """Per-sample ||x0_pred - x0||^2 / mean|x0_pred - x0| (the weight is a no-grad constant, floor 1e-5)."""
    dims = tuple(range(1, x0.dim()))
    with torch.no_grad():
        w = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    return ((x0_pred - x0).square() / w.to(x0.dtype)).mean(dim=dims)


@dataclass
class NFTLoss:
    """The loss and its parts (all float32 scalars; `loss` carries the gradient)."""

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    positive: Tensor
    negative: Tensor


def nft_loss(v_theta: Tensor, v_old: Tensor, v_ref: Tensor, z_t: Tensor, t: Tensor, u: Tensor, r: Tensor,
             beta: float = 1.0, adv_clip_max: float = 5.0, kl_weight: float = 1e-4, x0: Tensor | None = None) -> NFTLoss:
    """DiffusionNFT in x0 space (official code), for any anchor: x0 targets are z_t - t u (= z0 at tau=0), or the
    given `x0` (nft.target=tweedie: the old policy's estimate at z_tau, the same mean with less variance).

    v+ = (1-beta) v_old + beta v_theta, v- = (1+beta) v_old - beta v_theta;
    L = mean[adv_clip_max * (r L+ + (1-r) L-) / beta] + kl_weight * mean ||v_theta - v_ref||^2,
    with L+- the adaptively weighted x0 errors of v+-. Computed in float32 whatever the model's dtype.
    """
    v_theta, v_old, v_ref, z_t, u = (x.float() for x in (v_theta, v_old.detach(), v_ref.detach(), z_t, u))
    tb, r = bcast(t.float(), z_t), r.float().to(z_t.device)
    x0 = z_t - tb * u if x0 is None else x0.float()
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    pos = _weighted_x0_mse(z_t - tb * v_pos, x0)
    neg = _weighted_x0_mse(z_t - tb * v_neg, x0)
    policy = (adv_clip_max * (r * pos + (1 - r) * neg) / beta).mean()
    kl = (v_theta - v_ref).square().mean(dim=tuple(range(1, z_t.dim()))).mean()
    return NFTLoss(policy + kl_weight * kl, policy.detach(), kl.detach(), pos.mean().detach(), neg.mean().detach())


def tweedie_x0(z_tau: Tensor, tau: Tensor, v: Tensor) -> Tensor:
    """The one-step estimate of the clean latent from z_tau: z0_hat = z_tau - tau v(z_tau, tau) (z_tau at tau=0).

    For t > tau the bridge makes z_t depend on x0 only through z_tau, so E[z0_hat | z_t] = E[x0 | z_t] when v is
    the exact velocity: an unbiased target that, unlike z_t - t u, carries none of the bridge noise."""
    return z_tau - bcast(tau.to(z_tau.dtype), z_tau) * v


def old_policy_decay(step: int, rate: float = 0.001, max_decay: float = 0.5) -> float:
    """rho for theta_old <- rho theta_old + (1 - rho) theta after `step` optimizer steps: min(rate*step, max)."""
    return float(min(rate * max(step, 0), max_decay))
