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

import bootstrap  # noqa: F401  (the repository root on sys.path)

from actors.trainer.loop import run
from actors.trainer.pipeline import Algorithm
from rlstitch.train.grpo import draw_window, group_advantages


def grpo_batch(cfg, roll: dict, reward, prompts: list[str]) -> dict:
    """The recorded SDE steps of every rollout and its advantage within its prompt's group."""
    adv = group_advantages(reward, cfg.rollout.group_size, cfg.grpo.global_std)
    return {k: roll[k] for k in ("z_prev", "z_next", "logp", "steps")} | {"adv": adv, "prompts": prompts}


# rollouts: G samples per prompt, recorded SDE steps inside the draw's window, stopped at tau; scores: V(z_tau) from
# StitchVM, or the clean reward at t=0; learner: PPO-clipped ratio loss on a random subset of the recorded steps
GRPO = Algorithm(grpo_batch, method="sample_grpo",
                 window=lambda cfg, rng: draw_window(cfg.grpo.sde_window, cfg.grpo.window_size, rng))


def main(argv: list[str] | None = None, recipe: str = "grpo_sd35") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    return run(recipe, argv, GRPO)


if __name__ == "__main__":
    main()
