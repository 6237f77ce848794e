"""The draws in flight: an iteration's rollout tasks (and their scores) are submitted up to train.async_staleness
iterations ahead of the learner, each sampled with the weights published when it was submitted. Moved from
recipes/pipeline.py.

The rollout workers sample a draw in `rollout.stream_chunks` tasks per worker, the value actors score each task's
latents as soon as it finishes (its object ref goes straight from rollout task to value actor). A worker runs its
tasks in submission order, so a weight sync lands between two iterations' rollouts; train/staleness_* logs how
many iterations old each sample's weights are at the update. k = 0 is the synchronous loop: submit, wait,
update, sync.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict

import ray
import torch

from actors.rollout import weights_payload
from actors.trainer.state import Draw, RunState, draw_batch
from actors.trainer.world import World
from rlstitch.train.algorithms import Algorithm
from rlstitch.train.config import RecipeConfig


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



def new_draw(cfg: RecipeConfig, state: RunState, algo: Algorithm, iteration: int, version: int) -> Draw:
    """The next batch from the run's RNG and prompt stream (GRPO's window drawn after the stops, as always)."""
    prompts, seeds, stops = draw_batch(cfg, state)
    window = list(algo.window(cfg, state.rng)) if algo.window else None
    return Draw(iteration, prompts, seeds, stops, version, window)


def submit(world: World, algo: Algorithm, d: Draw) -> dict:
    """Start a draw's rollout tasks and (async) the scores of each as it finishes: Ray chains them, nothing is
    waited for. The synchronous loop keeps one task per worker and scores the whole batch after it, as it always
    did: a row's result can change in its last bits with the batch size, and staleness 0 must stay bit-identical."""
    streamed = world.cfg.train.async_staleness > 0
    extra = algo.job(world.cfg) | ({"window": d.window} if d.window is not None else {})
    chunks = world.cfg.rollout.stream_chunks if streamed else 1
    tasks = world.rollouts.submit(algo.method, d.prompts, d.seeds, d.stops, chunks, version=d.version, **extra)
    scores = [world.scorer.start(ref, prompts) for ref, prompts in tasks] if algo.scored and streamed else None
    return {"tasks": tasks, "scores": scores}


def scores(world: World, algo: Algorithm, job: dict, roll: dict, prompts: list[str]) -> tuple:
    """(reward, its parts) of a collected draw: the streamed scores, or the batch scored now; (None, {}) for DRaFT."""
    if job["scores"] is not None:
        return world.scorer.finish(job["scores"])
    return world.scorer.value(roll["z"], roll["tau"], prompts) if algo.scored else (None, {})


def restore_in_flight(world: World, state: RunState, pipe: Pipeline) -> None:
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


def settle(world: World, state: RunState, pipe: Pipeline) -> None:
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

