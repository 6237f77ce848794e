"""Evaluation and run reporting: held-out clean reward, one metrics line per iteration, the final summary.
Moved from recipes/driver.py."""

from __future__ import annotations

import time

from actors.metrics import record
from actors.rollout import EVAL
from actors.trainer.state import RunState
from actors.trainer.world import World, publish
from rlstitch.data.prompts import load_prompts
from rlstitch.train.config import RecipeConfig
from rlstitch.train.cost import add_work, cost_table
from rlstitch.train.run import image_grid


def eval_set(cfg: RecipeConfig) -> tuple[list[str], list[int]]:
    """Held-out prompts and their fixed noise seeds."""
    prompts = load_prompts(cfg.eval.prompts, cfg.eval.num_prompts)
    return prompts, [cfg.eval.seed + k for k in range(len(prompts))]


def evaluate(world: World, state: RunState, prompts: list[str], seeds: list[int]) -> dict:
    """Clean reward(s) of fully denoised samples with the current (or EMA) weights; logs a sample grid."""
    cfg = world.cfg
    start = time.perf_counter()
    publish(world, state.version, "ema" if cfg.eval.use_ema else "current", EVAL)
    out = world.rollouts.generate(prompts, seeds, grid=cfg.eval.grid)
    _, parts = world.eval_scorer.value(out["z"], 0.0, prompts)
    first = cfg.eval.rewards[0]
    r = parts[first].float().flatten()
    row = {"iteration": state.iteration, "step": state.version, "wall_s": round(state.train_s, 2),
           **{u: round(m.total(state.work), 4) for u, m in world.costs.items()},
           "clean_reward": float(r.mean()),
           # the standard error of the mean over the held-out prompts (one sample each), and the per-prompt
           # scores (same prompts and noise at every evaluation: paired comparisons between evaluations)
           "clean_reward_se": float(r.std() / len(r) ** 0.5) if len(r) > 1 else 0.0,
           **{f"clean_{k}": float(v.mean()) for k, v in parts.items()}}
    state.history.append(row | {"clean_per_prompt": [round(float(x), 6) for x in r]})
    images = None
    if out["images"] is not None and len(out["images"]):
        images = {"eval/samples": (image_grid(out["images"]), " | ".join(out["prompts"][:8]))}
    world.log.log({f"eval/{k}": v for k, v in row.items() if k not in ("iteration", "step", "wall_s")}
                  | {"eval/seconds": time.perf_counter() - start}, step=state.version, images=images)
    world.log.info(f"eval @ step {state.version} (iteration {state.iteration}): clean reward {first} = "
                   f"{row['clean_reward']:.4f}")
    return row


def count_work(world: World, state: RunState, work: dict) -> dict:
    """Add an iteration's counted work to the run's; returns its metrics: work/<op> rows, cost/<unit> of the
    iteration and cost/<unit>_total of the run so far."""
    add_work(state.work, work)
    metrics = {f"work/{k}": float(v) for k, v in work.items()}
    for unit, model in world.costs.items():
        metrics[f"cost/{unit}"] = model.total(work)
        metrics[f"cost/{unit}_total"] = model.total(state.work)
    return metrics


def log_iteration(world: World, state: RunState, stats: dict, reward_parts: dict, reward, tau, sync: dict,
                  seconds: dict, extra: dict | None = None) -> None:
    """One line of training metrics per iteration (wandb, jsonl, dashboard, progress bar)."""
    metrics = {f"train/{k}": v for k, v in stats.items() if k != "step"} | (extra or {})
    # Population std: a DRaFT iteration may score a single rollout, whose sample std is undefined (NaN).
    metrics |= {"time/train_s": state.train_s, "train/reward_mean": float(reward.mean()),
                "train/reward_std": float(reward.std(correction=0)),
                "train/tau_mean": float(tau.mean()), "train/tau_min": float(tau.min()), "train/tau_max": float(tau.max()),
                "train/iteration": state.iteration, "train/epoch": state.prompts.epoch,
                "sync/seconds": sync["seconds"], "sync/bytes": sync["bytes"],
                **{f"train/reward_{k}": float(v.mean()) for k, v in reward_parts.items()},
                **{f"time/{k}": v for k, v in seconds.items()}}
    world.log.log(metrics, step=state.version)
    record("rlstitch_reward_mean", float(reward.mean()), world.tags | {"role": "driver"})
    if metrics.get("cost/gpu_s", 0.0) > 0:  # counters take positive increments only
        record("rlstitch_cost_gpu_s_total", metrics["cost/gpu_s"], world.tags | {"role": "driver"})
    world.log.advance({"step": state.version, "reward": float(reward.mean()), "loss": stats.get("loss", 0.0)})


def finish(world: World, state: RunState, wall_s: float) -> dict:
    """Final summary: untrained vs final clean reward, steps, wall times (training only, and this process's
    loop including evaluations); always written."""
    hist = state.history
    costs = {u: round(m.total(state.work), 3) for u, m in world.costs.items()}
    world.log.info("compute of the run's training iterations (counted work x rlstitch/train/cost_table.json):\n"
                   + cost_table(state.work, world.costs))
    summary = {"cost": costs, "work": dict(state.work),"recipe": world.cfg.recipe, "mode": world.cfg.mode, "steps": state.version,
               "iterations": state.iteration, "epochs": state.prompts.epoch + state.prompts.offset / len(state.prompts.prompts),
               "train_s": round(state.train_s, 1), "loop_s": round(wall_s, 1), "untrained_clean_reward": hist[0]["clean_reward"] if hist else None,
               "final_clean_reward": hist[-1]["clean_reward"] if hist else None, "history": hist}
    world.log.finish(summary)
    return summary

