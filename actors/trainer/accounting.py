"""What an iteration cost and how well its scores ranked: counted work (rlstitch/train/cost.py) and the in-group
rank fidelity of V(z_tau) against the clean reward (nft.rank_every)."""

from __future__ import annotations

from collections import Counter

import ray
import torch

from actors.trainer.state import Draw
from actors.trainer.world import World
from rlstitch.train.algorithms import Algorithm


def iteration_work(world: World, algo: Algorithm, roll: dict, stats: dict, rows: int) -> dict:
    """An iteration's counted work: the rollout workers' denoiser rows, the scores (value or clean reward of every
    rollout), the learner's forwards/backwards and DRaFT's value gradients (popped from the learner's stats)."""
    learned = {k.removeprefix("work/"): stats.pop(k) for k in [k for k in stats if k.startswith("work/")]}
    work = Counter(roll.get("work", {}))
    work.update(world.scorer.work(rows) if algo.scored else {})
    work.update(world.scorer.work(int(learned.pop("value_grad", 0)), grad=True))
    work.update(learned)
    return {k: v for k, v in work.items() if v}


def rank_fidelity(world: World, algo: Algorithm, d: Draw, reward: torch.Tensor) -> dict:
    """nft.rank_every: diag/rank_spearman, the Spearman correlation within each prompt group of the training score
    V(z_tau) with the clean reward of the same rollout run on to t=0 (first nft.rank_groups groups; the weights
    published now, those of the draw at staleness 0). Diagnostic work, not counted as training compute."""
    cfg = world.cfg
    every = cfg.nft.rank_every if "old" in algo.slots and cfg.mode == "stitch" else 0
    if not every or d.iteration % every or reward is None:
        return {}
    n, G = cfg.nft.rank_groups * cfg.rollout.group_size, cfg.rollout.group_size
    tasks = world.rollouts.submit(algo.method, d.prompts[:n], d.seeds[:n], [cfg.sampler.steps] * n)
    z0 = world.rollouts.collect(tasks, int(ray.get(tasks[0][0])["version"]))["z"]
    _, parts = world.eval_scorer.value(z0, 0.0, d.prompts[:n])
    clean = parts[cfg.eval.rewards[0]].float()
    rho = [spearman(a, b) for a, b in zip(reward[:n].float().view(-1, G), clean.view(-1, G))]
    return {"diag/rank_spearman": float(sum(rho) / len(rho))}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by order; 0 when either is constant)."""
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return 0.0
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0
