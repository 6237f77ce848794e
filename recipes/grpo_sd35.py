"""python recipes/grpo_sd35.py [config=tiny|sd35-medium] [mode=stitch|baseline] [key=value ...]

On a cluster: ray job submit --working-dir . -- python recipes/grpo_sd35.py config=sd35-medium

Flow-GRPO on SD3.5 with StitchVM early stop (rlstitch/train/grpo.py): rollout workers sample groups of images per
prompt with the current policy, SDE steps (with their log-probabilities) inside grpo.sde_window and ODE steps
elsewhere; in mode=stitch each rollout stops at tau (drawn from rollout.stop_window, after every SDE step) and
StitchVM's V(z_tau) is the reward, in mode=baseline it runs to t=0 and the clean reward scores the decoded
sample. Group advantages feed the DeepSpeed learner group's PPO-clipped ratio loss (+ KL to the reference) on a
random subset of the recorded steps. Defaults run on the tiny world (tiny-sd3, tiny-clip, the committed
StitchVM). Outputs go to <out>: metrics.jsonl (train/logp_abs_diff_max: rollout/train log-prob consistency),
summary.json, wandb/ (offline unless WANDB_MODE is set), checkpoints/.
"""

from __future__ import annotations

import time

from driver import draw_batch, end_iteration, finish, log_iteration, open_run, sync_rollouts

from rlstitch.train.grpo import draw_window, group_advantages


def main(argv: list[str] | None = None, recipe: str = "grpo_sd35") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    cfg, state, world, evals = open_run(recipe, argv)
    try:
        t_run = time.perf_counter()
        g = cfg.grpo
        while state.iteration < cfg.iterations:
            # 1. rollouts: G samples per prompt, recorded SDE steps inside this iteration's window, stopped at tau
            t0 = time.perf_counter()
            prompts, seeds, stops = draw_batch(cfg, state)
            window = draw_window(g.sde_window, g.window_size, state.rng)
            roll = world.rollouts.sample_grpo(prompts, seeds, stops, window, state.version)

            # 2. scores: V(z_tau) from StitchVM, or the clean reward at t=0; -> advantages within each group
            t1 = time.perf_counter()
            reward, parts = world.scorer.value(roll["z"], roll["tau"], prompts)
            adv = group_advantages(reward, cfg.rollout.group_size, g.global_std)

            # 3. learner: PPO-clipped ratio loss on a random subset of each rollout's recorded steps
            t2 = time.perf_counter()
            stats = world.learner.update({k: roll[k] for k in ("z_prev", "z_next", "logp", "steps")}
                                         | {"adv": adv, "prompts": prompts})
            state.iteration, state.version = state.iteration + 1, int(stats["step"])

            # 4. weight sync: the new policy to every rollout worker
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
