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
from actors.trainer.pipeline import Algorithm
from rlstitch.train.nft import optimality_probability


def nft_batch(cfg, roll: dict, reward, prompts: list[str]) -> dict:
    """Rollouts stopped at tau and each sample's optimality probability within its prompt's group."""
    r = optimality_probability(reward, cfg.rollout.group_size, cfg.nft.adv_clip_max)
    return {"z": roll["z"], "tau": roll["tau"], "r": r, "prompts": prompts}


# rollouts: G samples per prompt from the old policy, each stopped at its tau; scores: V(z_tau) from StitchVM, or
# the clean reward at t=0; learner: NFT steps on the bridge anchored at z_tau, then the old-policy EMA
NFT = Algorithm(nft_batch)


def main(argv: list[str] | None = None, recipe: str = "nft_flux") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    return run(recipe, argv, NFT)


if __name__ == "__main__":
    main()
