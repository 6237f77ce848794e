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

from pipeline import Algorithm, run

from rlstitch.train.nft import optimality_probability


def nft_batch(cfg, roll: dict, reward, prompts: list[str]) -> dict:
    """Rollouts stopped at tau and each sample's optimality probability within its prompt's group."""
    r = optimality_probability(reward, cfg.rollout.group_size, cfg.nft.adv_clip_max)
    # nft.full_share: those rollouts went on to t=0 and anchor the learner there (tau 0), the others at z_tau
    return {"z": roll.get("z_anchor", roll["z"]), "tau": roll.get("tau_anchor", roll["tau"]), "r": r,
            "prompts": prompts}


def nft_job(cfg) -> dict:
    """Per-sample flags of the rollouts that go on past tau to t=0 (nft.full_share of the groups, mode=stitch)."""
    P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    n = round(cfg.nft.full_share * P) if cfg.mode == "stitch" else 0
    return {"full": [k // G < n for k in range(P * G)]} if n else {}


# rollouts: G samples per prompt from the old policy, each stopped at its tau; scores: V(z_tau) from StitchVM, or
# the clean reward at t=0; learner: NFT steps on the bridge anchored at z_tau, then the old-policy EMA
NFT = Algorithm(nft_batch, job=nft_job)


def main(argv: list[str] | None = None, recipe: str = "nft_flux") -> dict:
    """Train; returns the run summary (untrained and final clean reward, history of evaluations)."""
    return run(recipe, argv, NFT)


if __name__ == "__main__":
    main()
