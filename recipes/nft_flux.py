"""python recipes/nft_flux.py [config=tiny|flux-dev] [mode=stitch|baseline] [key=value ...]

On a cluster: ray job submit --working-dir . -- python recipes/nft_flux.py config=flux-dev

DiffusionNFT on FLUX with a Stitched Value Model (SPEC §3): rollout workers sample groups of images per
prompt with the old policy and stop at tau (drawn from rollout.stop_window), value actors score z_tau with
StitchVM (mode=stitch) or the clean reward of the fully denoised sample (mode=baseline), and the DeepSpeed
learner group regresses the policy towards the positive and away from the negative implicit policy on the
bridge anchored at z_tau. Defaults run on the tiny world (tiny-flux, tiny-clip, the committed StitchVM).
Outputs go to <out>: metrics.jsonl, summary.json, wandb/ (offline unless WANDB_MODE is set), checkpoints/.
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

from rlstitch.train.nft import optimality_probability  # noqa: E402
from rlstitch.train.policy import VOCABULARY, draw_stops  # noqa: E402


def main(argv: list[str] | None = None, recipe: str = "nft_flux") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    cfg = parse(recipe, argv)
    resume, info = peek_resume(cfg)
    state = new_state(cfg)
    world = start(cfg, resume_id=info.get("wandb_id"), start_iteration=int(info.get("iteration", 0)))
    try:
        if resume:
            restore(world, state, resume)
        sync_rollouts(world, state.version, full=True)  # first sync: base + adapter; later ones adapter-only
        world.log.info(f"{cfg.recipe} mode={cfg.mode}: {cfg.iterations} iterations x {cfg.train.updates_per_iteration} "
                       f"steps, {cfg.batch_size} rollouts per iteration. {VOCABULARY}.")
        eval_prompts, eval_seeds = eval_set(cfg)
        if state.iteration == 0:
            evaluate(world, state, eval_prompts, eval_seeds)  # the untrained generator
        t_run = time.perf_counter()
        P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size

        while state.iteration < cfg.iterations:
            # 1. rollouts: G samples per prompt from the old policy, each stopped at its tau
            t0 = time.perf_counter()
            prompts = [p for p in state.prompts.next(P) for _ in range(G)]
            seeds = torch.randint(0, 2**31 - 1, (P * G,), generator=state.rng).tolist()
            stops = draw_stops(P * G, cfg.stop_window, cfg.sampler.steps, state.rng,
                               G if cfg.rollout.tau_per == "group" else 1)
            roll = world.rollouts.sample(prompts, seeds, stops, state.version)

            # 2. scores: V(z_tau) from StitchVM, or the clean reward at t=0; -> optimality probability per group
            t1 = time.perf_counter()
            reward, parts = world.scorer.value(roll["z"], roll["tau"], prompts)
            r = optimality_probability(reward, G, cfg.nft.adv_clip_max)

            # 3. learner: NFT steps on the bridge anchored at z_tau, then the old-policy EMA
            t2 = time.perf_counter()
            stats = world.learner.update({"z": roll["z"], "tau": roll["tau"], "r": r, "prompts": prompts})
            state.iteration, state.version = state.iteration + 1, int(stats["step"])

            # 4. weight sync: the new old-policy adapter to every rollout worker
            t3 = time.perf_counter()
            sync = sync_rollouts(world, state.version)
            state.train_s += time.perf_counter() - t0
            log_iteration(world, state, stats, parts, reward, roll["tau"], sync,
                          {"rollout_s": t1 - t0, "score_s": t2 - t1, "learn_s": t3 - t2,
                           "sync_s": time.perf_counter() - t3, "denoise_steps": roll["denoise_steps"]})

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
