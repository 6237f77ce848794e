"""What a training run talks to: its config (`parse`) and the actor groups (`World`: rollout workers, value
actors, the learner group, the run logger), started by `start`. Moved from recipes/driver.py."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from actors.learner import LearnerGroup
from actors.rollout import RolloutGroup
from actors.runtime import init_ray
from actors.value import ValueActorPool, ValueClient, ValueSpec
from rlstitch.config import load_recipe_config, to_dict
from rlstitch.models.registry import BACKBONES, stitch_dir
from rlstitch.placement import RoleSpec
from rlstitch.stitch.artifact import read_manifest
from rlstitch.train.algorithms import algorithm
from rlstitch.train.config import RecipeConfig
from rlstitch.train.cost import latent_tokens, models_for
from rlstitch.train.run import RunLogger
from rlstitch.train.scoring import LazyCleanReward, Scorer

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"  # recipes/configs/<recipe>/<name>.yaml


def parse(recipe: str, argv: list[str] | None = None) -> RecipeConfig:
    """`config=<name or yaml>` picks recipes/configs/<recipe>/<name>.yaml (default: tiny); the rest are key=value."""
    return load_recipe_config(RecipeConfig, list(sys.argv[1:] if argv is None else argv), CONFIGS / recipe)


def role(cfg: RecipeConfig, name: str) -> RoleSpec:
    """The RoleSpec of a placement entry."""
    return getattr(cfg.placement, name)

@dataclass
class World:
    """Everything the driver talks to."""

    cfg: RecipeConfig
    rollouts: RolloutGroup
    learner: LearnerGroup
    scorer: Scorer  # the training signal: StitchVM(s) at z_tau, or the clean reward(s) at t=0
    eval_scorer: Scorer  # the clean reward model(s) on fully denoised samples
    log: RunLogger
    tags: dict
    groups: list = field(default_factory=list)
    costs: dict = field(default_factory=dict)  # unit ("gpu_s", "cpu_s") -> CostModel pricing the counted work

    def shutdown(self) -> None:
        """Stop every actor group (the learner first: its trainer thread waits on queues)."""
        for g in [self.learner, self.rollouts, *self.groups]:
            try:
                g.shutdown()
            except Exception as e:  # keep shutting the others down
                self.log.info(f"shutdown of {type(g).__name__} failed: {e!r}")


def _value_pool(cfg: RecipeConfig, spec: ValueSpec, estimator, tags: dict,
                label: str) -> tuple[ValueClient, ValueActorPool]:
    """Value actors of the "value" role hosting one estimator (a ValueSpec, or a lazily rebuilt CleanReward),
    named `label`-<rank> on the dashboard."""
    pool = ValueActorPool(spec, role(cfg, "value"), tags=tags, timeout_s=cfg.train.timeout_s, label=label,
                          estimator=estimator)
    return pool.client, pool


def build_scorers(cfg: RecipeConfig, tags: dict) -> tuple[Scorer, Scorer, list]:
    """Training and evaluation scorers; actors are shared where both need the same model."""
    tiny = os.environ.get("RLSTITCH_TINY_DIR")
    codec = BACKBONES[cfg.model.backbone].vae if cfg.model.codec == "auto" else cfg.model.codec
    pools: dict[tuple, ValueClient] = {}
    groups = []
    ops: dict[int, tuple] = {}  # id(client) -> the work ops of one scored row (forward, backward)

    def clean(name: str, path: str | None) -> ValueClient:
        key = ("clean", name, path)
        if key not in pools:
            # The hosted estimator is CleanReward: Tweedie at t=0 without its (then useless) denoiser call.
            spec = ValueSpec(kind="tweedie", backbone=cfg.model.backbone, reward=name, reward_path=path, tiny_dir=tiny)
            lazy = LazyCleanReward(codec, cfg.model.codec_path, name, path, tiny)
            pools[key], g = _value_pool(cfg, spec, lazy, tags, f"value-clean-{name}")
            groups.append(g)
            ops[id(pools[key])] = (("decode", "reward"), ("decode_reward_bwd",))
        return pools[key]

    def stitch(name: str, path: str | None, artifact: str) -> ValueClient:
        spec = ValueSpec(kind="stitchvm", backbone=cfg.model.backbone, backbone_path=cfg.model.path, reward=name,
                         reward_path=path, stitch=artifact, tiny_dir=tiny)
        client, g = _value_pool(cfg, spec, None, tags, f"value-stitch-{name}")
        groups.append(g)
        i = read_manifest(stitch_dir(artifact))["i"]
        ops[id(client)] = ((f"value_fwd/i={i}",), (f"value_bwd/i={i}",))
        return client

    paths = list(cfg.reward.paths) or [None] * len(cfg.reward.names)
    train = {}
    for k, (name, path) in enumerate(zip(cfg.reward.names, paths)):
        train[name] = stitch(name, path, cfg.reward.stitches[k]) if cfg.mode == "stitch" else clean(name, path)
    eval_paths = list(cfg.eval.reward_paths) or [None] * len(cfg.eval.rewards)
    evals = {name: clean(name, path) for name, path in zip(cfg.eval.rewards, eval_paths)}
    weights = dict(zip(cfg.reward.names, cfg.reward.weights))
    return (Scorer(train, weights, {k: ops[id(c)] for k, c in train.items()}),
            Scorer(evals, {k: 1.0 for k in evals}, {k: ops[id(c)] for k, c in evals.items()}), groups)


def start(cfg: RecipeConfig, resume_id: str | None = None, start_iteration: int = 0) -> World:
    """Ray (joined or local), value actors, rollout workers, the learner group and the logger."""
    tiny = os.environ.get("RLSTITCH_TINY_DIR")
    roles = [role(cfg, r) for r in ("rollout", "value", "learner")]
    need = sum(r.cpus for r in roles) + 2 * roles[1].cpus
    # A local instance gets enough logical CPUs for every role (with async_staleness > 0 they run at once).
    # On a busy machine Python workers can take over a minute to import torch; Ray's 60 s default kills them.
    os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")
    init_ray(need=need + 1)
    run = f"{cfg.recipe}-{cfg.mode}-{int(time.time())}"
    tags = {"recipe": cfg.recipe, "run": run}
    out = Path(cfg.out)
    log = RunLogger(out, to_dict(cfg), cfg.iterations, use_wandb=cfg.log.wandb, project=cfg.log.project,
                    name=cfg.log.run_name or f"{cfg.recipe}-{cfg.mode}", resume_id=resume_id,
                    progress=cfg.log.progress, start=start_iteration)
    scorer, eval_scorer, groups = build_scorers(cfg, tags | {"role": "value"})
    rollouts = RolloutGroup(cfg, role(cfg, "rollout"), tags | {"role": "rollout"}, tiny_dir=tiny)
    value = None if algorithm(cfg).scored else scorer  # DRaFT: the learner asks for dV/dz itself
    learner = LearnerGroup(cfg, role(cfg, "learner"), tags | {"role": "learner"}, value=value, tiny_dir=tiny,
                           storage=out / "ray_train")
    costs = models_for(cfg.model.backbone, latent_tokens(cfg.model.backbone, cfg.model.latent_size))
    return World(cfg, rollouts, learner, scorer, eval_scorer, log, tags, groups, costs)


def publish(world: World, version: int, which: str = "sample", slot: str = "default", full: bool = False) -> dict:
    """The learner's weights (`which`; with the base weights when full) for every rollout worker's `slot`, through
    one object-store copy that the next tasks carry; not waited for. Returns the sync's seconds and bytes, and
    "published" (the ref)."""
    pub = world.learner.publish(which, version, slot, base=full)
    return world.rollouts.set_published(pub, version, slot, full) | {"published": pub}
