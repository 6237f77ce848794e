"""Flow-GRPO (Liu et al. 2025, yifan123/flow_grpo): the SDE step with its Gaussian log-probability, group
advantages, the PPO-clipped ratio loss and the closed-form KL to the reference policy.

Time convention (SPEC §0): t=1 noise, t=0 clean, sigma = t, a step goes from t to t_next < t (dt < 0).
Two variants of the step z_next ~ N(mean, std^2 I) given the velocity v at (z, t):

  sde: s_t = a sqrt(t / (1 - t)) (t=1 uses the grid's second time in the denominator, as the published code),
       mean = z (1 + s_t^2 dt / (2t)) + v (1 + s_t^2 (1 - t) / (2t)) dt,   std = s_t sqrt(-dt)
  cps: std = t_next sin(a pi / 2),  mean = (1 - t_next) (z - t v) + sqrt(t_next^2 - std^2) (z + (1 - t) v)

The log-probability is the Gaussian log-density averaged over the latent's dimensions (the published code's
normalisation; its cps variant drops the constants and the 1/(2 std^2) scale, here both variants keep the
exact density so that ratios are true likelihood ratios). Everything is computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlstitch.sampling.flow import bcast

VARIANTS = ("sde", "cps")


def _times(t: Tensor | float, z: Tensor) -> Tensor:
    """A scalar or per-sample time as float32, shaped to broadcast against z."""
    return bcast(torch.as_tensor(t, dtype=torch.float32, device=z.device), z.float())


def step_gaussian(z: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float, variant: str = "sde",
                  noise_level: float = 0.7, sigma_max: float | None = None) -> tuple[Tensor, Tensor]:
    """(mean, std) of p(z_next | z) for one SDE step from t to t_next; std broadcasts against z.

    sigma_max: the grid's first time below 1 (the sde variant's stand-in for t=1 in sqrt(t / (1 - t)))."""
    z, v = z.float(), v.float()
    t, tn = _times(t, z), _times(t_next, z)
    if bool((tn >= t).any()):
        raise ValueError("an SDE step needs t_next < t for every sample")
    if variant == "sde":
        if bool((t >= 1).any()) and sigma_max is None:
            raise ValueError("the sde variant at t=1 needs sigma_max (the schedule's time after t=1)")
        denom = torch.where(t >= 1, torch.full_like(t, sigma_max if sigma_max is not None else 0.0), t)
        s = noise_level * torch.sqrt(t / (1 - denom))
        dt = tn - t
        mean = z * (1 + s**2 / (2 * t) * dt) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt
        return mean, s * torch.sqrt(-dt)
    if variant == "cps":
        std = tn * math.sin(noise_level * math.pi / 2)
        if bool((std <= 0).any()):
            raise ValueError("the cps variant has no noise on a step to t=0: keep that step out of the SDE window")
        mean = (1 - tn) * (z - t * v) + torch.sqrt(tn**2 - std**2) * (z + (1 - t) * v)
        return mean, std
    raise ValueError(f"unknown Flow-GRPO variant {variant!r}; known: {list(VARIANTS)}")


def log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample Gaussian log-density of x under N(mean, std^2), averaged over the non-batch dimensions."""
    x, mean, std = x.float(), mean.float(), std.float().expand_as(mean)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.dim())))


def sde_step(z: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float, noise: Tensor, variant: str = "sde",
             noise_level: float = 0.7, sigma_max: float | None = None) -> tuple[Tensor, Tensor]:
    """One sampled SDE step: (z_next = mean + std * noise, its log-probability)."""
    mean, std = step_gaussian(z, v, t, t_next, variant, noise_level, sigma_max)
    z_next = mean + std * noise.float()
    return z_next, log_prob(z_next, mean, std)


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per sample, averaged over dimensions like `log_prob`."""
    kl = (mean.float() - mean_ref.float()) ** 2 / (2 * std.float().expand_as(mean) ** 2)
    return kl.mean(dim=tuple(range(1, kl.dim())))


def group_advantages(rewards: Tensor, group_size: int, global_std: bool = True, eps: float = 1e-4) -> Tensor:
    """(r - mean of its prompt group) / (std + eps), std over the batch (global_std) or the group; population std
    as the published per-prompt stat tracker. Samples are ordered group by group."""
    r = rewards.double().flatten()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    std = r.std(correction=0) if global_std else g.std(dim=1, correction=0, keepdim=True)
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).flatten().float()


@dataclass
class GRPOLoss:
    """The loss and its parts (float32 scalars; `loss` carries the gradient)."""

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    ratio_mean: Tensor
    clip_frac: Tensor


def grpo_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, clip_range: float = 1e-4, adv_clip_max: float = 5.0,
              kl: Tensor | None = None, beta: float = 0.0, weight: Tensor | None = None) -> GRPOLoss:
    """PPO-clipped policy loss max(-A r, -A clip(r, 1-c, 1+c)) with r = exp(logp - logp_old) and A clipped to
    +-adv_clip_max, plus beta * KL; both averaged with `weight` (default: uniform) over the rows."""
    logp = logp.float()
    a = adv.float().to(logp.device).clamp(-adv_clip_max, adv_clip_max)
    w = torch.ones_like(logp) if weight is None else weight.float().to(logp.device)
    w = w / w.sum()
    ratio = torch.exp(logp - logp_old.float().to(logp.device))
    per = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
    policy = (w * per).sum()
    kl_mean = (w * kl.float()).sum() if kl is not None else torch.zeros((), device=logp.device)
    clipped = ((ratio - 1).abs() > clip_range).float()
    return GRPOLoss(policy + beta * kl_mean, policy.detach(), kl_mean.detach(), (w * ratio).sum().detach(),
                    (w * clipped).sum().detach())


def draw_window(sde_window, window_size: int, generator: torch.Generator) -> tuple[int, int]:
    """This iteration's SDE steps [lo, hi): the whole window, or a random `window_size`-step part of it."""
    lo, hi = int(sde_window[0]), int(sde_window[1])
    if not window_size:
        return lo, hi
    start = int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator))
    return start, start + window_size


def choose_steps(n: int, recorded: int, per_sample: int, generator: torch.Generator) -> Tensor:
    """[n, per_sample] distinct indices into each sample's `recorded` steps (a random subset per sample)."""
    if not 1 <= per_sample <= recorded:
        raise ValueError(f"cannot train {per_sample} of {recorded} recorded steps per sample")
    return torch.stack([torch.randperm(recorded, generator=generator)[:per_sample] for _ in range(n)])


def padded_chunks(n: int, size: int) -> list[tuple[Tensor, int]]:
    """Row indices 0..n-1 in chunks of exactly `size` (the last padded by repeating its last row), with the
    number of real rows in each. Sampler and learner run every recorded step's forward at this one batch size:
    CPU (and GPU) kernels are picked by batch size, and a row's output can change in the last bits with it."""
    if n < 1 or size < 1:
        raise ValueError(f"need n >= 1 rows and a chunk size >= 1, got n={n} size={size}")
    out = []
    for start in range(0, n, size):
        idx = torch.arange(start, min(start + size, n))
        real = len(idx)
        out.append((torch.cat([idx, idx[-1:].expand(size - real)]), real))
    return out
