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


def main(argv: list[str] | None = None, recipe: str = "grpo_sd35") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    return run(recipe, argv)


if __name__ == "__main__":
    main()
