"""python recipes/draft_sd35.py [config=tiny|sd35-medium] [mode=stitch|baseline] [key=value ...]

On a cluster: ray job submit --working-dir . -- python recipes/draft_sd35.py config=sd35-medium

DRaFT-K on SD3.5 with a Stitched Value Model (SPEC §3): rollout workers run each sample without gradients to
K steps before its stop (mode=stitch: tau drawn per rollout from rollout.stop_window; baseline: t=0), the
DeepSpeed learner group runs the last K steps with gradients, and the value actors return dV/dz at the stop
(StitchVM at z_tau, or the clean reward through decoder and reward model at t=0). The learner backpropagates
that gradient (z_tau.backward(-dV/dz), V frozen) plus the regulariser lambda * ||v - v_base||^2 (lambda 0.01).
Defaults run on the tiny world (tiny-sd3, tiny-clip, the committed StitchVM). Outputs go to <out>.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from driver import (  # noqa: E402
    eval_set,
    evaluate,
    finish,
    log_iteration,
    new_state,
    parse,
    peek_resume,
    restore,
    save,
    start,
    sync_rollouts,
)

from rlstitch.train.policy import VOCABULARY, draw_stops  # noqa: E402


def main(argv: list[str] | None = None, recipe: str = "draft_sd35") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    cfg = parse(recipe, argv)
    resume, info = peek_resume(cfg)
    state = new_state(cfg)
    world = start(cfg, resume_id=info.get("wandb_id"), start_iteration=int(info.get("iteration", 0)))
    try:
        if resume:
            restore(world, state, resume)
        sync_rollouts(world, state.version, full=True)  # first sync: base + adapter; later ones adapter-only
        world.log.info(f"{cfg.recipe} mode={cfg.mode} K={cfg.draft.k}: {cfg.iterations} iterations x "
                       f"{cfg.train.updates_per_iteration} steps, {cfg.batch_size} rollouts per iteration. {VOCABULARY}.")
        eval_prompts, eval_seeds = eval_set(cfg)
        if state.iteration == 0:
            evaluate(world, state, eval_prompts, eval_seeds)  # the untrained generator
        t_run = time.perf_counter()
        P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size

        while state.iteration < cfg.iterations:
            # 1. rollouts without gradients, each to K steps before its stop (tau, or t=0 in the baseline)
            t0 = time.perf_counter()
            prompts = [p for p in state.prompts.next(P) for _ in range(G)]
            seeds = torch.randint(0, 2**31 - 1, (P * G,), generator=state.rng).tolist()
            stops = draw_stops(P * G, cfg.stop_window, cfg.sampler.steps, state.rng,
                               G if cfg.rollout.tau_per == "group" else 1)
            roll = world.rollouts.sample(prompts, seeds, stops, state.version, draft_k=cfg.draft.k)

            # 2. learner: the last K steps with gradients; the value actors give dV/dz at the stop (inside update)
            t1 = time.perf_counter()
            stats = world.learner.update({"z": roll["z"], "stop": roll["stops"], "prompts": prompts})
            state.iteration, state.version = state.iteration + 1, int(stats["step"])

            # 3. weight sync: the updated adapter to every rollout worker
            t2 = time.perf_counter()
            sync = sync_rollouts(world, state.version)
            state.train_s += time.perf_counter() - t0
            reward = torch.tensor([stats["value"]])
            log_iteration(world, state, stats, {}, reward, roll["tau"], sync,
                          {"rollout_s": t1 - t0, "learn_s": t2 - t1, "sync_s": time.perf_counter() - t2,
                           "denoise_steps": roll["denoise_steps"]})

            last = state.iteration == cfg.iterations
            if last or (cfg.eval.every and state.iteration % cfg.eval.every == 0):
                evaluate(world, state, eval_prompts, eval_seeds)
            if last or (cfg.checkpoint.every and state.iteration % cfg.checkpoint.every == 0):
                save(world, state)
        return finish(world, state, time.perf_counter() - t_run)
    finally:
        world.shutdown()


if __name__ == "__main__":
    main()
