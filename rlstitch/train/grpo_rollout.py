"""Flow-GRPO rollouts, Ray-free: ODE outside the SDE window, recorded SDE steps inside it, each sample stopped at
its own stop step (tau in mode=stitch, t=0 in the baseline).

A recorded step keeps what the learner needs to recompute its log-probability: the latent before and after,
the step index and the sampler's log-probability. Every recorded step's velocity is computed in chunks of
exactly `chunk` rows, the learner's micro-batch, so that the learner's recomputation sees the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rlstitch.sampling.flow import randn
from rlstitch.train.grpo import log_prob, padded_chunks, sde_step, step_gaussian


def step_times(grid: Tensor, steps: Tensor) -> tuple[Tensor, Tensor, float]:
    """Per-sample float32 (t, t_next) of step indices on the float64 grid, and the sde variant's sigma_max."""
    return grid[steps].float(), grid[steps + 1].float(), float(grid[1])


def chunked(fn: Callable[[Tensor], Tensor], n: int, chunk: int) -> Tensor:
    """fn(row indices) over 0..n-1 in padded chunks of exactly `chunk` rows; the padding rows are dropped."""
    parts = [fn(idx)[:real] for idx, real in padded_chunks(n, chunk)]
    return torch.cat(parts)


def recorded_logprob(v: Tensor, z: Tensor, z_next: Tensor, steps: Tensor, grid: Tensor, variant: str,
                     noise_level: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log p(z_next | z), mean, std) of recorded steps given the velocity at z: the learner's recomputation."""
    t, tn, sigma_max = step_times(grid, steps.cpu())
    mean, std = step_gaussian(z, v, t.to(z.device), tn.to(z.device), variant, noise_level, sigma_max)
    return log_prob(z_next.to(mean.device), mean, std), mean, std


@torch.no_grad()
def sample_recorded(velocity: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor, grid: Tensor,
                    stops: Sequence[int], window: tuple[int, int], chunk: int, generators: Sequence[torch.Generator],
                    variant: str = "sde", noise_level: float = 0.7) -> dict:
    """Roll every sample from t=1 to its stop, SDE at steps window[0] <= k < window[1] (all before every stop).

    velocity(z, t, rows) gets per-sample float32 times and the batch rows it runs on. Returns {"z": latents at
    the stops, "z_prev"/"z_next": [N, W, ...] around each recorded step, "logp": [N, W], "steps": [N, W]}."""
    lo, hi = int(window[0]), int(window[1])
    stops_t = torch.as_tensor(list(stops), dtype=torch.long)
    n = z.shape[0]
    if stops_t.numel() != n or not 0 <= lo < hi or bool((stops_t < hi).any()) or bool((stops_t > len(grid) - 1).any()):
        raise ValueError(f"the SDE window [{lo}, {hi}) must end before every stop (<= {len(grid) - 1}), got stops "
                         f"{stops_t.tolist()}")
    W = hi - lo
    z_prev = torch.zeros((n, W, *z.shape[1:]), dtype=torch.float32)  # records stay on the CPU (sent to the learner)
    z_next = torch.zeros_like(z_prev)
    logp = torch.zeros(n, W)
    out, rows, cur = z.clone(), torch.arange(n), z
    for k in range(int(stops_t.max())):
        keep = stops_t[rows] > k
        rows, cur = rows[keep], cur[keep]
        ks = torch.full((len(rows),), k, dtype=torch.long)
        t, tn, _ = step_times(grid, ks)
        if lo <= k < hi:
            v = chunked(lambda i, c=cur, r=rows, tt=t: velocity(c[i], tt[i], r[i]), len(rows), chunk)
            noise = randn(cur.shape, [generators[int(i)] for i in rows], cur.device, torch.float32)
            nxt, lp = sde_step(cur, v, t.to(cur.device), tn.to(cur.device), noise, variant, noise_level, float(grid[1]))
            z_prev[rows, k - lo], z_next[rows, k - lo], logp[rows, k - lo] = cur.float().cpu(), nxt.cpu(), lp.cpu()
            cur = nxt.to(cur.dtype)
        else:
            cur = cur + (float(grid[k + 1]) - float(grid[k])) * velocity(cur, t, rows)
        done = stops_t[rows] == k + 1
        out[rows[done]] = cur[done]
    steps = torch.arange(lo, hi).expand(n, W).clone()
    return {"z": out, "z_prev": z_prev, "z_next": z_next, "logp": logp, "steps": steps}
