"""The learner's Flow-GRPO update, Ray-free: recompute the chosen recorded steps' log-probabilities with the
current policy (and their means under the reference, adapters off, for the KL), then the PPO-clipped loss.

Each rank trains `timesteps_per_sample` random recorded steps of each of its samples. The (sample, step) pairs
run in padded micro-batches of exactly `train.micro_batch` rows, the batch size the rollout workers computed
the recorded velocities with: that makes the recomputed log-probabilities at the first update of an
iteration equal to the sampler's bit for bit in fp32 (the ratio is exactly 1), whatever kernels the batch
size selects. `logp_abs_diff_max` reports max |logp_learner - logp_sampler| over that first update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlstitch.train.grpo import choose_steps, gaussian_kl, grpo_loss, padded_chunks, step_gaussian
from rlstitch.train.grpo_rollout import recorded_logprob, step_times
from rlstitch.train.policy import REF

STATS = ("loss", "policy_loss", "kl", "ratio_mean", "clip_frac")


def grpo_accumulation(per_rank: int, timesteps_per_sample: int, micro_batch: int) -> int:
    """Backward passes per optimizer step on one rank: padded micro-batches of the rank's (sample, step) pairs."""
    return math.ceil(per_rank * timesteps_per_sample / micro_batch)


def grpo_step(learner, batch: dict, rows: Tensor, gen: torch.Generator, first: bool) -> dict:
    """One optimizer step of Flow-GRPO on this rank's `rows`; `first`: the iteration's first update, whose
    weights sampled the batch (so its log-probability differences measure rollout/train consistency)."""
    cfg, g = learner.cfg, learner.cfg.grpo
    picks = choose_steps(len(rows), batch["logp"].shape[1], g.timesteps_per_sample, gen)
    sample = rows.repeat_interleave(g.timesteps_per_sample)
    col = picks.flatten()
    total = len(sample)
    acc, diff = dict.fromkeys(STATS, 0.0), 0.0
    chunks = padded_chunks(total, cfg.train.micro_batch)
    for idx, real in chunks:
        i, j = sample[idx], col[idx]
        weight = (torch.arange(len(idx)) < real).float()
        out, lp_diff = _pair_loss(learner, batch, i, j, weight)
        # The engine divides by the accumulation count: rescale so the sum is the mean over the real pairs.
        learner.engine.backward(out.loss * real / total * len(chunks))
        learner.engine.step()
        for k in STATS:
            acc[k] += float(getattr(out, k) if k != "loss" else out.loss.detach()) * real / total
        if first:
            diff = max(diff, lp_diff)
    return acc | ({"logp_abs_diff_max": diff} if first else {})


def _pair_loss(learner, batch: dict, i: Tensor, j: Tensor, weight: Tensor):
    """The loss of one micro-batch of (sample i, recorded step j) pairs, and max |delta logp| over its real rows."""
    g, dev = learner.cfg.grpo, learner.device
    z, z_next, steps = batch["z_prev"][i, j].float(), batch["z_next"][i, j].float(), batch["steps"][i, j]
    t, _, _ = step_times(learner.grid, steps)
    cond = learner.cond([batch["prompts"][k] for k in i.tolist()])
    z_d, t_d = z.to(dev), t.to(dev)
    v = learner.engine(z_d, t_d, cond)
    logp, mean, std = recorded_logprob(v, z_d, z_next, steps, learner.grid, g.variant, g.noise_level)
    kl = None
    if g.beta > 0:
        with torch.no_grad():
            v_ref = learner.policy.velocity(z_d, t_d, cond, REF)
            t_ref, tn_ref, sigma_max = step_times(learner.grid, steps)
            mean_ref, _ = step_gaussian(z_d, v_ref, t_ref.to(dev), tn_ref.to(dev), g.variant, g.noise_level, sigma_max)
        kl = gaussian_kl(mean, mean_ref, std)
    old = batch["logp"][i, j].float().to(dev)
    out = grpo_loss(logp, old, batch["adv"][i], g.clip_range, g.adv_clip_max, kl, g.beta, weight)
    real = weight.bool().to(dev)
    return out, float((logp.detach() - old)[real].abs().max())
