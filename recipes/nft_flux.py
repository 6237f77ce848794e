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

import time

from driver import draw_batch, end_iteration, finish, log_iteration, open_run, sync_rollouts

from rlstitch.train.nft import optimality_probability


def main(argv: list[str] | None = None, recipe: str = "nft_flux") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    cfg, state, world, evals = open_run(recipe, argv)
    try:
        t_run = time.perf_counter()
        while state.iteration < cfg.iterations:
            # 1. rollouts: G samples per prompt from the old policy, each stopped at its tau
            t0 = time.perf_counter()
            prompts, seeds, stops = draw_batch(cfg, state)
            roll = world.rollouts.sample(prompts, seeds, stops, state.version)

            # 2. scores: V(z_tau) from StitchVM, or the clean reward at t=0; -> optimality probability per group
            t1 = time.perf_counter()
            reward, parts = world.scorer.value(roll["z"], roll["tau"], prompts)
            r = optimality_probability(reward, cfg.rollout.group_size, cfg.nft.adv_clip_max)

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
            end_iteration(world, state, evals)
        return finish(world, state, time.perf_counter() - t_run)
    finally:
        world.shutdown()


if __name__ == "__main__":
    main()
