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

import bootstrap  # noqa: F401  (the repository root on sys.path)

from actors.trainer.loop import run


def main(argv: list[str] | None = None, recipe: str = "nft_flux") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    return run(recipe, argv)


if __name__ == "__main__":
    main()
