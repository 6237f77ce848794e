"""python recipes/fks.py [config=NAME|FILE.yaml] [key=value ...]   (the tiny world: starts a local Ray instance)

On a cluster: ray job submit --working-dir . -- python recipes/fks.py [config=NAME|FILE.yaml] [key=value ...]

FK steering with N particles x M proposals, values from value actors (SPEC §2).

NAME is a file of recipes/configs/fks/ (default tiny; also sd35-medium, sd35-large, flux-dev, which need
backbone_path=, reward_path= and value.stitch= for weights on your cluster).

Each prompt's N particles (fk.particles) run on one rollout actor (placement.rollout); prompts are spread over
the actors. At resampling steps (every fk.resample_every steps inside [fk.window_start, fk.window_end] of the
grid) particles are weighted by the potential (fk.potential: diff | max | add, fk.lam) and resampled
(fk.adaptive: only when ESS < N/2); with fk.proposals=M > 1 each particle draws M SDE proposals during the first
fk.proposal_frac of the steps and keeps the best under V. value.kind=tweedie is standard FKS, value.kind=stitchvm
the StitchVM variant; fk.resample_every=0 and fk.proposals=1 give Best-of-N. Output: out/images.png and
out/rewards.json (clean reward of each selected decoded image, and the network evaluations counted).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bootstrap

from actors.group import ActorGroup
from actors.sampler import InferenceConfig, SamplerActor, begin, run_chunks, write_outputs
from actors.value import ValueActorPool
from recipes.dps import options, parse
from rlstitch.config import ConfigError, to_dict
from rlstitch.sampling.fk import FKConfig

CONFIGS = bootstrap.CONFIGS / "fks"


@dataclass
class FKSConfig(InferenceConfig):
    """The shared inference knobs plus FK steering."""

    fk: FKConfig = field(default_factory=FKConfig)
    out: str = "outputs/fks/tiny"

    def validate(self) -> None:
        """Start-up checks naming the knob to change."""
        super().validate()
        try:
            self.fk.validate()
        except ValueError as e:
            raise ConfigError(f"fk: {e}") from None


def run(cfg: FKSConfig) -> dict:
    """Place the value pool and the rollout actors, steer every prompt, write images, rewards and counts."""
    out = Path(cfg.out)
    tags, prompts, seeds = begin(cfg, "fks")
    pool = ValueActorPool(cfg.value_spec(), cfg.placement.value, cfg.value.policy, tags) if cfg.fk.uses_value else None
    client = pool.client if pool is not None else None
    rollout = ActorGroup(SamplerActor, cfg.placement.rollout, cfg.models(), client, tags=tags, role="rollout")
    try:
        start = time.perf_counter()
        opts = {**options(cfg), "fk": asdict(cfg.fk), "value_kind": cfg.value.kind}
        results = run_chunks(rollout.workers, "fks", prompts, seeds, cfg.chunk, opts, "fks")
        evals: dict[str, int] = {}
        for r in results:
            for k, v in r["evals"].items():
                evals[k] = evals.get(k, 0) + v
        extra = {"seconds": time.perf_counter() - start, "evals": evals,
                 "evals_per_prompt": sum(evals.values()) / len(prompts), "config": to_dict(cfg)}
        summary = write_outputs(out, prompts, seeds, results, extra)
    finally:
        rollout.shutdown()
        if pool is not None:
            pool.shutdown()
    print(f"FKS {cfg.value.kind} N={cfg.fk.particles} M={cfg.fk.proposals}: mean clean reward "
          f"{summary['reward_mean']:.4f}, {summary['evals_per_prompt']:.0f} network evaluations per prompt; "
          f"images and rewards in {out}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """CLI: config=NAME and key=value overrides."""
    return run(parse(list(sys.argv[1:] if argv is None else argv), FKSConfig, CONFIGS))


if __name__ == "__main__":
    main()
