"""python recipes/dps.py [config=NAME|FILE.yaml] [key=value ...]   (the tiny world: starts a local Ray instance)

On a cluster: ray job submit --working-dir . -- python recipes/dps.py [config=NAME|FILE.yaml] [key=value ...]

DPS gradient guidance with a value model served by value actors (SPEC §2).

NAME is a file of recipes/configs/dps/ (default tiny; also sd35-medium, sd35-large, flux-dev, which need
backbone_path=, reward_path= and value.stitch= for weights on your cluster).

Rollout actors (placement.rollout) hold the frozen backbone, codec and clean reward and run the SDE sampler
with the drift v + c_t * scale * grad V, c_t = -3t/(1-t) (clipped at max_coeff); value.kind=stitchvm takes the
gradient of V only, value.kind=tweedie backpropagates through denoiser + decoder + reward. V and grad V come
from the value actor pool (placement.value). Output: out/images.png (one tile per prompt) and out/rewards.json
(clean reward of every decoded final image; with baseline=true also of the unguided sample with the same seeds).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import bootstrap

from actors.group import ActorGroup
from actors.sampler import InferenceConfig, SamplerActor, begin, run_chunks, write_outputs
from actors.value import ValueActorPool
from rlstitch.config import ConfigError, load_recipe_config, to_dict

CONFIGS = bootstrap.CONFIGS / "dps"
DEFAULT_CONFIG = "tiny"


@dataclass
class DPSConfig(InferenceConfig):
    """The shared inference knobs plus the guidance."""

    scale: float = 1.0  # guidance scale multiplying c_t
    max_coeff: float = 10.0  # t/(1-t) clipped here (it diverges at t=1)
    baseline: bool = True  # also sample without guidance (same seeds) and report both rewards
    out: str = "outputs/dps/tiny"

    def validate(self) -> None:
        """Start-up checks naming the knob to change."""
        super().validate()
        if self.max_coeff <= 0:
            raise ConfigError(f"max_coeff must be > 0, got {self.max_coeff}")


def parse(argv: list[str], schema=DPSConfig, folder: Path = CONFIGS):
    """config=NAME (default tiny) and key=value overrides -> a validated config."""
    return load_recipe_config(schema, argv, folder, DEFAULT_CONFIG)


def options(cfg: InferenceConfig) -> dict:
    """What every rollout call needs (plain data)."""
    return {"steps": cfg.steps, "shift": cfg.shift, "grid": cfg.grid(), "noise_level": cfg.noise_level, "cfg_scale": cfg.cfg_scale,
            "latent_hw": list(cfg.latent_hw)}


def run(cfg: DPSConfig) -> dict:
    """Place the value pool and the rollout actors, guide every prompt, write images and rewards."""
    out = Path(cfg.out)
    tags, prompts, seeds = begin(cfg, "dps")
    pool = ValueActorPool(cfg.value_spec(), cfg.placement.value, cfg.value.policy, tags)
    rollout = ActorGroup(SamplerActor, cfg.placement.rollout, cfg.models(), pool.client, tags=tags, role="rollout")
    try:
        start = time.perf_counter()
        opts = {**options(cfg), "scale": cfg.scale, "max_coeff": cfg.max_coeff, "baseline": cfg.baseline}
        results = run_chunks(rollout.workers, "dps", prompts, seeds, cfg.chunk, opts, "dps")
        extra = {"seconds": time.perf_counter() - start, "config": to_dict(cfg)}
        if cfg.baseline:
            base = [x for r in results for x in r["baseline_reward"]]
            extra |= {"baseline_reward": base, "baseline_reward_mean": sum(base) / len(base)}
        summary = write_outputs(out, prompts, seeds, results, extra)
    finally:
        rollout.shutdown()
        pool.shutdown()
    gain = f" (unguided {summary['baseline_reward_mean']:.4f})" if cfg.baseline else ""
    print(f"DPS {cfg.value.kind} scale {cfg.scale}: mean clean reward {summary['reward_mean']:.4f}{gain}; "
          f"images and rewards in {out}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """CLI: config=NAME and key=value overrides."""
    return run(parse(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
