"""What every training recipe's driver shares: config loading, the three actor groups, evaluation, checkpoints.

Only the single controller (the recipe process) imports this module; everything sent to Ray actors lives in
the `actors` and `rlstitch` packages.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from bootstrap import CONFIGS

from actors.group import ActorGroup
from actors.learner import LearnerGroup
from actors.metrics import record
from actors.rollout import EVAL, RolloutGroup
from actors.runtime import init_ray
from actors.value import ValueActor, ValueClient, ValueSpec
from rlstitch.config import load_recipe_config, to_dict
from rlstitch.data.prompts import load_prompts
from rlstitch.models.registry import BACKBONES, stitch_dir
from rlstitch.placement import RoleSpec
from rlstitch.stitch.artifact import read_manifest
from rlstitch.train.config import RecipeConfig
from rlstitch.train.cost import add_work, cost_table, latent_tokens, models_for
from rlstitch.train.policy import VOCABULARY, PromptStream, draw_stops
from rlstitch.train.run import RunLogger, find_resume, image_grid, load_run, save_run
from rlstitch.train.scoring import LazyCleanReward, Scorer


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
                label: str) -> tuple[ValueClient, ActorGroup]:
    """Value actors of the "value" role hosting one estimator (a ValueSpec, or a lazily rebuilt CleanReward),
    named `label`-<rank> on the dashboard."""
    kwargs = {"estimator": estimator} if estimator is not None else {}
    group = ActorGroup(ValueActor, role(cfg, "value"), asdict(spec), tags=tags, role="value", label=label, **kwargs)
    return ValueClient(group.workers, timeout_s=cfg.train.timeout_s), group


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
            ops[id(pools[key])] = (("decode", "reward"), ("decode_reward_bwd",))
            groups.append(g)
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
    value = scorer if cfg.algorithm == "draft" else None
    learner = LearnerGroup(cfg, role(cfg, "learner"), tags | {"role": "learner"}, value=value, tiny_dir=tiny,
                           storage=out / "ray_train")
    costs = models_for(cfg.model.backbone, latent_tokens(cfg.model.backbone, cfg.model.latent_size))
    return World(cfg, rollouts, learner, scorer, eval_scorer, log, tags, groups, costs)


# --------------------------------------------------------------------------------------------- state


@dataclass
class DriverState:
    """What the driver owns between iterations (all of it goes into checkpoints)."""

    iteration: int
    version: int  # learner step of the weights the rollout workers hold
    rng: torch.Generator  # rollout seeds and stop draws
    prompts: PromptStream
    history: list = field(default_factory=list)  # evaluations so far
    wandb_id: str | None = None
    train_s: float = 0.0  # wall seconds spent in iterations (rollouts, scores, learner, sync); no evals or saves
    # async_staleness > 0, restored from a checkpoint: the draws that were in flight, and the weights they were
    # sampled with ({version: adapter}); the pipeline re-submits them first
    in_flight: list = field(default_factory=list)
    in_flight_weights: dict = field(default_factory=dict)
    work: Counter = field(default_factory=Counter)  # counted training work so far, {op: rows} (rlstitch/train/cost.py)


def new_state(cfg: RecipeConfig) -> DriverState:
    """A fresh run: seeded RNG, prompt stream at the start."""
    rng = torch.Generator().manual_seed(cfg.train.seed)
    return DriverState(0, 0, rng, PromptStream(load_prompts(cfg.data.prompts, cfg.data.num_prompts), cfg.train.seed))


def checkpoint_dir(cfg: RecipeConfig) -> Path:
    """Where a run's checkpoints go."""
    return Path(cfg.out) / "checkpoints"


def peek_resume(cfg: RecipeConfig) -> tuple[Path | None, dict]:
    """The checkpoint to resume from (if resuming) and its info (for the wandb id before the logger starts)."""
    import json

    path = find_resume(checkpoint_dir(cfg)) if cfg.checkpoint.resume else None
    return path, (json.loads((path / "info.json").read_text()) if path else {})


def restore(world: World, state: DriverState, path: Path) -> None:
    """Load a checkpoint into the learner group and the driver state (data position, RNG, step, history, the draws
    in flight and their weights)."""
    states, info, extra = load_run(path, state.rng)
    world.learner.load_state(states)
    state.iteration, state.version = int(info["iteration"]), int(info["learner_step"])
    state.prompts.load_state(info["data"])
    state.history = list(info.get("history", []))
    state.train_s = float(info.get("train_s", 0.0))
    state.wandb_id = info.get("wandb_id")
    state.in_flight = list(info.get("in_flight", []))
    state.work = Counter({k: float(v) for k, v in info.get("work", {}).items()})
    state.in_flight_weights = {int(name.split("-")[1]): t for name, t in extra.items() if name.startswith("sampled-")}
    world.log.info(f"resumed from {path}: iteration {state.iteration}, step {state.version}, "
                   f"epoch {state.prompts.epoch} (+{state.prompts.offset} prompts), {len(state.in_flight)} draws in flight")


def save(world: World, state: DriverState, in_flight: list[dict] = (), weights: dict[int, dict] | None = None) -> Path:
    """A full checkpoint of the run as it stands after `state.iteration` iterations, with the draws already in flight
    (their prompts, seeds, stops and versions; the RNG and data position are past them) and {version: adapter} of
    the weights they were sampled with, so a resume re-samples exactly them."""
    path = save_run(checkpoint_dir(world.cfg), state.iteration, world.learner.state(), state.rng,
                    keep=world.cfg.checkpoint.keep, extra={f"sampled-{v}": w for v, w in (weights or {}).items()},
                    iteration=state.iteration, data=state.prompts.state(), history=state.history,
                    train_s=state.train_s, work=dict(state.work), wandb_id=world.log.run_id, config=to_dict(world.cfg),
                    in_flight=list(in_flight))
    world.log.info(f"checkpoint: {path}")
    return path


def publish(world: World, version: int, which: str = "sample", slot: str = "default", full: bool = False) -> dict:
    """The learner's weights (`which`; with the base weights when full) for every rollout worker's `slot`, through
    one object-store copy that the next tasks carry; not waited for. Returns the sync's seconds and bytes, and
    "published" (the ref)."""
    pub = world.learner.publish(which, version, slot, base=full)
    return world.rollouts.set_published(pub, version, slot, full) | {"published": pub}


# --------------------------------------------------------------------------------------------- eval


def eval_set(cfg: RecipeConfig) -> tuple[list[str], list[int]]:
    """Held-out prompts and their fixed noise seeds."""
    prompts = load_prompts(cfg.eval.prompts, cfg.eval.num_prompts)
    return prompts, [cfg.eval.seed + k for k in range(len(prompts))]


def evaluate(world: World, state: DriverState, prompts: list[str], seeds: list[int]) -> dict:
    """Clean reward(s) of fully denoised samples with the current (or EMA) weights; logs a sample grid."""
    cfg = world.cfg
    start = time.perf_counter()
    publish(world, state.version, "ema" if cfg.eval.use_ema else "current", EVAL)
    out = world.rollouts.generate(prompts, seeds, grid=cfg.eval.grid)
    _, parts = world.eval_scorer.value(out["z"], 0.0, prompts)
    first = cfg.eval.rewards[0]
    r = parts[first].float().flatten()
    row = {"iteration": state.iteration, "step": state.version, "wall_s": round(state.train_s, 2),
           **{u: round(sum(m.seconds(state.work).values()), 4) for u, m in world.costs.items()},
           "clean_reward": float(r.mean()),
           # the standard error of the mean over the held-out prompts (one sample each), and the per-prompt
           # scores (same prompts and noise at every evaluation: paired comparisons between evaluations)
           "clean_reward_se": float(r.std() / len(r) ** 0.5) if len(r) > 1 else 0.0,
           **{f"clean_{k}": float(v.mean()) for k, v in parts.items()}}
    state.history.append(row | {"clean_per_prompt": [round(float(x), 6) for x in r]})
    images = None
    if out["images"] is not None and len(out["images"]):
        images = {"eval/samples": (image_grid(out["images"]), " | ".join(out["prompts"][:8]))}
    world.log.log({f"eval/{k}": v for k, v in row.items() if k not in ("iteration", "step", "wall_s")}
                  | {"eval/seconds": time.perf_counter() - start}, step=state.version, images=images)
    world.log.info(f"eval @ step {state.version} (iteration {state.iteration}): clean reward {first} = "
                   f"{row['clean_reward']:.4f}")
    return row


def count_work(world: World, state: DriverState, work: dict) -> dict:
    """Add an iteration's counted work to the run's; returns its metrics: work/<op> rows, cost/<unit> of the
    iteration and cost/<unit>_total of the run so far."""
    add_work(state.work, work)
    metrics = {f"work/{k}": float(v) for k, v in work.items()}
    for unit, model in world.costs.items():
        metrics[f"cost/{unit}"] = sum(model.seconds(work).values())
        metrics[f"cost/{unit}_total"] = sum(model.seconds(state.work).values())
    return metrics


def log_iteration(world: World, state: DriverState, stats: dict, reward_parts: dict, reward, tau, sync: dict,
                  seconds: dict, extra: dict | None = None) -> None:
    """One line of training metrics per iteration (wandb, jsonl, dashboard, progress bar)."""
    metrics = {f"train/{k}": v for k, v in stats.items() if k != "step"} | (extra or {})
    # Population std: a DRaFT iteration may score a single rollout, whose sample std is undefined (NaN).
    metrics |= {"time/train_s": state.train_s, "train/reward_mean": float(reward.mean()),
                "train/reward_std": float(reward.std(correction=0)),
                "train/tau_mean": float(tau.mean()), "train/tau_min": float(tau.min()), "train/tau_max": float(tau.max()),
                "train/iteration": state.iteration, "train/epoch": state.prompts.epoch,
                "sync/seconds": sync["seconds"], "sync/bytes": sync["bytes"],
                **{f"train/reward_{k}": float(v.mean()) for k, v in reward_parts.items()},
                **{f"time/{k}": v for k, v in seconds.items()}}
    world.log.log(metrics, step=state.version)
    record("rlstitch_reward_mean", float(reward.mean()), world.tags | {"role": "driver"})
    if "cost/gpu_s_total" in metrics:
        record("rlstitch_cost_gpu_s_total", metrics["cost/gpu_s_total"], world.tags | {"role": "driver"})
    world.log.advance({"step": state.version, "reward": float(reward.mean()), "loss": stats.get("loss", 0.0)})


def finish(world: World, state: DriverState, wall_s: float) -> dict:
    """Final summary: untrained vs final clean reward, steps, wall times (training only, and this process's
    loop including evaluations); always written."""
    hist = state.history
    costs = {u: round(sum(m.seconds(state.work).values()), 3) for u, m in world.costs.items()}
    world.log.info("compute of the run's training iterations (counted work x rlstitch/train/cost_table.json):\n"
                   + cost_table(state.work, world.costs))
    summary = {"cost": costs, "work": dict(state.work),"recipe": world.cfg.recipe, "mode": world.cfg.mode, "steps": state.version,
               "iterations": state.iteration, "epochs": state.prompts.epoch + state.prompts.offset / len(state.prompts.prompts),
               "train_s": round(state.train_s, 1), "loop_s": round(wall_s, 1), "untrained_clean_reward": hist[0]["clean_reward"] if hist else None,
               "final_clean_reward": hist[-1]["clean_reward"] if hist else None, "history": hist}
    world.log.finish(summary)
    return summary


# --------------------------------------------------------------------------------------------- run skeleton


def open_run(recipe: str, argv: list[str] | None) -> tuple[RecipeConfig, DriverState, World, tuple[list, list]]:
    """Config, actors and driver state of a run: resumed from its last checkpoint if any, the rollout workers
    given the full weights, and the untrained generator evaluated on a fresh run. Returns (cfg, state, world,
    (eval prompts, eval seeds)); the caller shuts the world down."""
    cfg = parse(recipe, argv)
    resume, info = peek_resume(cfg)
    state = new_state(cfg)
    world = start(cfg, resume_id=info.get("wandb_id"), start_iteration=int(info.get("iteration", 0)))
    try:
        if resume:
            restore(world, state, resume)
        publish(world, state.version, full=True)  # first sync: base + adapter; later ones adapter-only
        k = f" K={cfg.draft.k}" if cfg.algorithm == "draft" else ""
        world.log.info(f"{cfg.recipe} mode={cfg.mode}{k}: {cfg.iterations} iterations x "
                       f"{cfg.train.updates_per_iteration} steps, {cfg.batch_size} rollouts per iteration. {VOCABULARY}.")
        evals = eval_set(cfg)
        if state.iteration == 0:
            evaluate(world, state, *evals)  # the untrained generator
    except BaseException:
        world.shutdown()
        raise
    return cfg, state, world, evals


def draw_batch(cfg: RecipeConfig, state: DriverState) -> tuple[list[str], list[int], list[int]]:
    """The next iteration's prompts (group_size copies of each), noise seeds and stop steps, from the run's RNG."""
    P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    prompts = [p for p in state.prompts.next(P) for _ in range(G)]
    seeds = torch.randint(0, 2**31 - 1, (P * G,), generator=state.rng).tolist()
    stops = draw_stops(P * G, cfg.stop_window, cfg.sampler.steps, state.rng,
                       G if cfg.rollout.tau_per == "group" else 1)
    return prompts, seeds, stops


def end_iteration(world: World, state: DriverState, evals: tuple[list, list], settle=None, in_flight=None) -> None:
    """Evaluate and checkpoint when the schedule (or the last iteration) says so. `settle()` first finishes the work
    in flight (timed as training), `in_flight()` gives save's draws and weights in flight."""
    cfg = world.cfg
    last = state.iteration == cfg.iterations
    if last or (cfg.eval.every and state.iteration % cfg.eval.every == 0):
        if settle is not None:
            settle()
        evaluate(world, state, *evals)
    if last or (cfg.checkpoint.every and state.iteration % cfg.checkpoint.every == 0):
        save(world, state, *(in_flight() if in_flight is not None else ()))
