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

import time

import torch
from driver import draw_batch, end_iteration, finish, log_iteration, open_run, sync_rollouts


def main(argv: list[str] | None = None, recipe: str = "draft_sd35") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    cfg, state, world, evals = open_run(recipe, argv)
    try:
        t_run = time.perf_counter()
        while state.iteration < cfg.iterations:
            # 1. rollouts without gradients, each to K steps before its stop (tau, or t=0 in the baseline)
            t0 = time.perf_counter()
            prompts, seeds, stops = draw_batch(cfg, state)
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
            end_iteration(world, state, evals)
        return finish(world, state, time.perf_counter() - t_run)
    finally:
        world.shutdown()


if __name__ == "__main__":
    main()
