"""The training loop every recipe runs: synchronous, or pipelined with bounded staleness (train.async_staleness).

An iteration draws a batch (prompts, seeds, stops, GRPO's window), the rollout workers sample it in
`rollout.stream_chunks` tasks per worker, the value actors score each task's latents as soon as it finishes (its
object ref goes straight from rollout task to value actor), the learner updates on the batch and publishes the new
sampling weights once in the object store, and every rollout worker loads that one copy.

With async_staleness = k >= 1 the driver submits the rollouts and scores of iterations n+1..n+k before it waits for
the learner's update on iteration n, so rollout workers, value actors and learner work at the same time. A worker
runs its tasks in submission order, so a weight sync lands between two iterations' rollouts: every draw is sampled
with the weights published when it was submitted (recorded per sample; train/staleness_* logs how many iterations
old they are at the update). k = 0 is the synchronous loop: submit, wait, update, sync.

Exact resume: a checkpoint records the draws in flight (and the RNG / data position past them) with the weights
they were sampled with; a resumed run re-submits exactly them under those weights, so its weights equal the
uninterrupted run's bit for bit. `<out>/ledger.jsonl` lists every draw that reached the learner.

Lost workers: a rollout or value worker that dies is restarted by Ray (placement.<role>.max_restarts), on
another node if its own is gone, and re-runs the tasks it lost; every task carries its inputs and the refs of its
weights, so the re-run gives the same bits. A lost learner (LearnerLost) restarts the whole run from its latest
checkpoint (checkpoint.restarts times at most), which by exact resume ends with the undisturbed run's weights;
the ledger then drops the iterations the lost learner had trained past that checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch
from driver import (
    DriverState,
    World,
    count_work,
    draw_batch,
    end_iteration,
    finish,
    log_iteration,
    open_run,
    publish,
)
from driver import parse as parse_config

from actors.learner import LearnerLost
from actors.rollout import weights_payload
from rlstitch.io import atomic_write_text
from rlstitch.train.config import RecipeConfig

log = logging.getLogger("rlstitch.pipeline")


@dataclass
class Draw:
    """One iteration's rollout job: what was drawn for it and the weight version it is sampled with."""

    iteration: int
    prompts: list[str]
    seeds: list[int]
    stops: list[int]
    version: int
    window: list[int] | None = None  # Flow-GRPO's recorded SDE steps [lo, hi)


@dataclass(frozen=True)
class Algorithm:
    """What one recipe's iteration does inside the shared loop."""

    batch: Callable  # (cfg, roll, reward, prompts) -> the learner's batch
    method: str = "sample"  # the rollout workers' method
    scored: bool = True  # False: the learner asks the value actors itself (DRaFT)
    window: Callable | None = None  # (cfg, rng) -> a GRPO SDE window per draw
    job: Callable | None = None  # cfg -> extra fields of every rollout job (DRaFT's K)


class Pipeline:
    """The draws in flight (oldest first, at most staleness + 1), the weights they were sampled with, and a ledger
    of what reached the learner. Ray-free: `draw(iteration, version)` and `submit(draw)` are the caller's."""

    def __init__(self, staleness: int, total: int, start: int, draw: Callable, submit: Callable):
        self.staleness, self.total = staleness, total
        self.draw, self.submit = draw, submit
        self.queue: deque = deque()  # (Draw, the submitted job)
        self.next = start  # the next iteration to draw
        self.weights: dict[int, object] = {}  # version -> published weights, while a draw of that version is pending

    def resubmit(self, draws: list[Draw]) -> None:
        """Submit restored in-flight draws (already drawn: the RNG is past them), oldest first."""
        for d in draws:
            if d.iteration != self.next:
                raise RuntimeError(f"restored draw of iteration {d.iteration}, expected {self.next}")
            self.queue.append((d, self.submit(d)))
            self.next += 1

    def take(self, iteration: int, version: int) -> tuple[Draw, object]:
        """Draw and submit iterations up to iteration + staleness (sampled with `version`), then pop `iteration`'s."""
        while self.next <= min(iteration + self.staleness, self.total - 1):
            d = self.draw(self.next, version)
            self.queue.append((d, self.submit(d)))
            self.next += 1
        d, job = self.queue.popleft()
        if d.iteration != iteration:
            raise RuntimeError(f"the pipeline holds iteration {d.iteration}'s draw, the loop is at {iteration}")
        return d, job

    def published(self, version: int, weights) -> None:
        """Remember the weights of `version`; forget those no pending draw (or future draw) uses."""
        self.weights[version] = weights
        keep = {d.version for d, _ in self.queue} | {version}
        self.weights = {v: w for v, w in self.weights.items() if v in keep}

    def in_flight(self) -> tuple[list[dict], dict[int, object]]:
        """The pending draws (as dicts) and {version: weights} of those they were sampled with."""
        draws = [d for d, _ in self.queue]
        return [asdict(d) for d in draws], {d.version: self.weights[d.version] for d in draws}

    def jobs(self) -> list:
        """The submitted jobs still pending."""
        return [job for _, job in self.queue]


def staleness_stats(versions: torch.Tensor, step: int, per_iteration: int, k: int) -> dict:
    """How many iterations old the weights of each sample were at the update: mean, max and the share of each age."""
    age = (step - versions.float()) / per_iteration
    return {"staleness_mean": float(age.mean()), "staleness_max": float(age.max()),
            **{f"staleness_{a}": float((age == a).float().mean()) for a in range(k + 1)}}


# --------------------------------------------------------------------------------------------- the Ray side


def new_draw(cfg: RecipeConfig, state: DriverState, algo: Algorithm, iteration: int, version: int) -> Draw:
    """The next batch from the run's RNG and prompt stream (GRPO's window drawn after the stops, as always)."""
    prompts, seeds, stops = draw_batch(cfg, state)
    window = list(algo.window(cfg, state.rng)) if algo.window else None
    return Draw(iteration, prompts, seeds, stops, version, window)


def submit(world: World, algo: Algorithm, d: Draw) -> dict:
    """Start a draw's rollout tasks and (async) the scores of each as it finishes: Ray chains them, nothing is
    waited for. The synchronous loop keeps one task per worker and scores the whole batch after it, as it always
    did: a row's result can change in its last bits with the batch size, and staleness 0 must stay bit-identical."""
    streamed = world.cfg.train.async_staleness > 0
    extra = (algo.job(world.cfg) if algo.job else {}) | ({"window": d.window} if d.window is not None else {})
    chunks = world.cfg.rollout.stream_chunks if streamed else 1
    tasks = world.rollouts.submit(algo.method, d.prompts, d.seeds, d.stops, chunks, version=d.version, **extra)
    scores = [world.scorer.start(ref, prompts) for ref, prompts in tasks] if algo.scored and streamed else None
    return {"tasks": tasks, "scores": scores}


def scores(world: World, algo: Algorithm, job: dict, roll: dict, prompts: list[str]) -> tuple:
    """(reward, its parts) of a collected draw: the streamed scores, or the batch scored now; (None, {}) for DRaFT."""
    if job["scores"] is not None:
        return world.scorer.finish(job["scores"])
    return world.scorer.value(roll["z"], roll["tau"], prompts) if algo.scored else (None, {})


def iteration_work(world: World, algo: Algorithm, roll: dict, stats: dict, rows: int) -> dict:
    """An iteration's counted work: the rollout workers' denoiser rows, the scores (value or clean reward of every
    rollout), the learner's forwards/backwards and DRaFT's value gradients (popped from the learner's stats)."""
    learned = {k.removeprefix("work/"): stats.pop(k) for k in [k for k in stats if k.startswith("work/")]}
    work = Counter(roll.get("work", {}))
    work.update(world.scorer.work(rows) if algo.scored else {})
    work.update(world.scorer.work(int(learned.pop("value_grad", 0)), grad=True))
    work.update(learned)
    return {k: v for k, v in work.items() if v}


def rank_fidelity(world: World, algo: Algorithm, d: Draw, reward: torch.Tensor) -> dict:
    """nft.rank_every: diag/rank_spearman, the Spearman correlation within each prompt group of the training score
    V(z_tau) with the clean reward of the same rollout run on to t=0 (first nft.rank_groups groups; the weights
    published now, those of the draw at staleness 0). Diagnostic work, not counted as training compute."""
    cfg = world.cfg
    every = cfg.nft.rank_every if cfg.algorithm == "nft" and cfg.mode == "stitch" else 0
    if not every or d.iteration % every:
        return {}
    n = cfg.nft.rank_groups * cfg.rollout.group_size
    tasks = world.rollouts.submit(algo.method, d.prompts[:n], d.seeds[:n], [cfg.sampler.steps] * n)
    z0 = world.rollouts.collect(tasks, state_version(tasks))["z"]
    _, parts = world.eval_scorer.value(z0, 0.0, d.prompts[:n])
    clean = parts[cfg.eval.rewards[0]].float()
    rho = [spearman(a, b) for a, b in zip(reward[:n].float().view(-1, cfg.rollout.group_size),
                                          clean.view(-1, cfg.rollout.group_size))]
    return {"diag/rank_spearman": float(sum(rho) / len(rho))}


def state_version(tasks: list) -> int:
    """The weight version the given (finished) rollout tasks sampled with."""
    return int(ray.get(tasks[0][0])["version"])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by order; 0 when either is constant)."""
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return 0.0
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def restore_in_flight(world: World, state: DriverState, pipe: Pipeline) -> None:
    """Re-submit a checkpoint's draws in flight under the weights they were first sampled with (the caller then
    publishes the learner's current sampling weights, which the next draws are sampled with)."""
    draws = [Draw(**d) for d in state.in_flight]
    for v in dict.fromkeys(d.version for d in draws):
        adapter = state.in_flight_weights[v]
        ref = ray.put(weights_payload(v, adapter))
        world.rollouts.set_published({"ref": ref, "bytes": 0}, v)
        pipe.weights[v] = {"ref": ref}
        pipe.resubmit([d for d in draws if d.version == v])
    state.in_flight, state.in_flight_weights = [], {}


def settle(world: World, state: DriverState, pipe: Pipeline) -> None:
    """Wait for every submitted rollout and score (before an evaluation, which would otherwise hide their time)."""
    start = time.perf_counter()
    refs = [ref for job in pipe.jobs() for ref, _ in job["tasks"]]
    refs += [r for job in pipe.jobs() for s in job["scores"] or [] for r in s.values()]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=world.cfg.train.timeout_s)
    state.train_s += time.perf_counter() - start


def adapters(pipe: Pipeline) -> tuple[list[dict], dict[int, dict]]:
    """The draws in flight and the adapters they were sampled with (fetched from the object store for a save)."""
    draws, weights = pipe.in_flight()
    return draws, {v: ray.get(w["ref"])["adapter"] for v, w in weights.items()}


def run(recipe: str, argv: list[str] | None, algo: Algorithm) -> dict:
    """Train a recipe; returns the run summary (untrained and final clean reward, history of evaluations). A lost
    learner restarts the run from its latest checkpoint, at most checkpoint.restarts times."""
    argv = list(sys.argv[1:] if argv is None else argv)
    restarts, attempt = parse_config(recipe, argv).checkpoint.restarts, 0
    while True:
        try:
            return train(recipe, argv, algo)
        except LearnerLost as e:
            attempt += 1
            if attempt > restarts:
                raise
            log.warning(f"learner lost ({e}); restart {attempt} of {restarts} from the latest checkpoint")
            argv = [*argv, "checkpoint.resume=true"]


def trim_ledger(path: Path, iterations: int) -> None:
    """Keep the ledger's draws of the first `iterations` iterations (a resumed run's learner has trained exactly
    those; a lost learner may have trained past its checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["iteration"] < iterations]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def train(recipe: str, argv: list[str], algo: Algorithm) -> dict:
    """One attempt at the run: open (or resume) it and iterate to the end."""
    cfg, state, world, evals = open_run(recipe, argv)
    try:
        t_run = time.perf_counter()
        U, k = cfg.train.updates_per_iteration, cfg.train.async_staleness
        pipe = Pipeline(k, cfg.iterations, state.iteration,
                        lambda i, v: new_draw(cfg, state, algo, i, v), lambda d: submit(world, algo, d))
        restore_in_flight(world, state, pipe)
        # the weights the next draws are sampled with, kept while they are in flight (a save stores them)
        pipe.published(state.version, publish(world, state.version)["published"])
        ledger = Path(cfg.out) / "ledger.jsonl"
        trim_ledger(ledger, state.iteration)
        while state.iteration < cfg.iterations:
            # 1. rollouts (and their scores) of this iteration and the next k, then wait for this one's
            t0 = time.perf_counter()
            d, job = pipe.take(state.iteration, state.version)
            roll = world.rollouts.collect(job["tasks"], d.version)
            t1 = time.perf_counter()
            reward, parts = scores(world, algo, job, roll, d.prompts)

            # 2. learner: the recipe's update on the batch (meanwhile the next k iterations roll out)
            t2 = time.perf_counter()
            learn_at = time.time()
            stats = world.learner.update(algo.batch(cfg, roll, reward, d.prompts))
            learned = [round(learn_at, 3), round(time.time(), 3)]  # epoch seconds: a timeline's learner spans
            stats |= staleness_stats(roll["versions"], state.version, U, k)
            work = iteration_work(world, algo, roll, stats, len(d.prompts))
            diag = rank_fidelity(world, algo, d, reward) if reward is not None else {}
            state.iteration, state.version = state.iteration + 1, int(stats["step"])

            # 3. weight sync: the new sampling weights, put once in the object store, loaded between iterations
            t3 = time.perf_counter()
            sync = publish(world, state.version)
            pipe.published(state.version, sync["published"])
            state.train_s += time.perf_counter() - t0
            with open(ledger, "a") as f:  # an append-only log, like metrics.jsonl
                f.write(json.dumps({"iteration": d.iteration, "version": d.version, "step": state.version,
                                    "prompts": d.prompts, "seeds": d.seeds, "learned": learned}) + "\n")
            if reward is None:  # DRaFT: the learner's value of its rollouts
                reward = torch.tensor([stats["value"]])
            log_iteration(world, state, stats, parts, reward, roll["tau"], sync,
                          {"rollout_s": t1 - t0, "score_s": t2 - t1, "learn_s": t3 - t2,
                           "sync_s": time.perf_counter() - t3, "denoise_steps": roll["denoise_steps"]},
                          count_work(world, state, work) | diag)
            end_iteration(world, state, evals, lambda: settle(world, state, pipe), lambda: adapters(pipe))
        return finish(world, state, time.perf_counter() - t_run)
    finally:
        world.shutdown()
