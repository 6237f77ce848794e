"""What the controller owns between iterations, all of it checkpointed: the iteration, the weights version (the
one place it is kept), the RNG and prompt stream, the evaluations, the draws in flight and their weights.
Moved from recipes/driver.py (DriverState -> RunState) and recipes/pipeline.py (Draw, trim_ledger)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlstitch.config import to_dict
from rlstitch.data.prompts import load_prompts
from rlstitch.io import atomic_write_text
from rlstitch.train.config import RecipeConfig
from rlstitch.train.policy import PromptStream, draw_stops
from rlstitch.train.run import find_resume, load_run, save_run

if TYPE_CHECKING:
    from actors.trainer.world import World


@dataclass
class Draw:
    """One iteration's rollout job: what was drawn for it and the weight version it is sampled with."""

    iteration: int
    prompts: list[str]
    seeds: list[int]
    stops: list[int]
    version: int
    window: list[int] | None = None  # Flow-GRPO's recorded SDE steps [lo, hi)


@dataclass
class RunState:
    """What the controller owns between iterations (all of it goes into checkpoints)."""

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


def new_state(cfg: RecipeConfig) -> RunState:
    """A fresh run: seeded RNG, prompt stream at the start."""
    rng = torch.Generator().manual_seed(cfg.train.seed)
    return RunState(0, 0, rng, PromptStream(load_prompts(cfg.data.prompts, cfg.data.num_prompts), cfg.train.seed))


def checkpoint_dir(cfg: RecipeConfig) -> Path:
    """Where a run's checkpoints go."""
    return Path(cfg.out) / "checkpoints"


def peek_resume(cfg: RecipeConfig) -> tuple[Path | None, dict]:
    """The checkpoint to resume from (if resuming) and its info (for the wandb id before the logger starts)."""
    path = find_resume(checkpoint_dir(cfg)) if cfg.checkpoint.resume else None
    return path, (json.loads((path / "info.json").read_text()) if path else {})


def restore(world: World, state: RunState, path: Path) -> None:
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


def save(world: World, state: RunState, in_flight: list[dict] = (), weights: dict[int, dict] | None = None) -> Path:
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



def draw_batch(cfg: RecipeConfig, state: RunState) -> tuple[list[str], list[int], list[int]]:
    """The next iteration's prompts (group_size copies of each), noise seeds and stop steps, from the run's RNG."""
    P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    prompts = [p for p in state.prompts.next(P) for _ in range(G)]
    seeds = torch.randint(0, 2**31 - 1, (P * G,), generator=state.rng).tolist()
    stops = draw_stops(P * G, cfg.stop_window, cfg.sampler.steps, state.rng,
                       G if cfg.rollout.tau_per == "group" else 1)
    return prompts, seeds, stops



@dataclass
class LedgerRow:
    """One line of <out>/ledger.jsonl: a draw that reached the learner (missing fields: defaults)."""

    iteration: int = 0
    version: int = 0  # the weights it was sampled with
    step: int = 0  # the learner step after its update
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    learned: list[float] = field(default_factory=list)  # epoch seconds [start, end] of the update


def read_ledger(path: str | Path) -> list[LedgerRow]:
    """The ledger's rows in order (none when the file is missing): the one reader of ledger.jsonl."""
    path = Path(path)
    return [LedgerRow(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def append_ledger(path: str | Path, row: LedgerRow) -> None:
    """Append one row (an append-only log, like metrics.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(asdict(row)) + "\n")


def trim_ledger(path: Path, iterations: int) -> None:
    """Keep the ledger's draws of the first `iterations` iterations (a resumed run's learner has trained exactly
    those; a lost learner may have trained past its checkpoint)."""
    if not path.exists():
        return
    keep = [row for row in read_ledger(path) if row.iteration < iterations]
    atomic_write_text(path, "".join(json.dumps(asdict(row)) + "\n" for row in keep))
