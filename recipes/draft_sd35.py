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

import bootstrap  # noqa: F401  (the repository root on sys.path)

from actors.trainer.loop import run


def main(argv: list[str] | None = None, recipe: str = "draft_sd35") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    return run(recipe, argv)


if __name__ == "__main__":
    main()
