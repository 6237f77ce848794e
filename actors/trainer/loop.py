"""The training loop every recipe runs, on the single controller (the recipe process): synchronous, or pipelined
with bounded staleness (train.async_staleness; actors/trainer/pipeline.py). Moved from recipes/pipeline.py and
recipes/driver.py. An iteration reads top to bottom in its phases:

  draw       the batch (prompts, seeds, stops, GRPO's window) from the run's RNG and prompt stream, and the
             next k iterations' draws; each is submitted to the rollout workers (and its scores to the value
             actors) with the weights version it is sampled with
  roll out   wait for this iteration's rollouts
  score      the value actors' reward of them (streamed per task when k > 0; none for DRaFT)
  learn      the learner group's update on the algorithm's batch; the weights version moves to its step
  publish    the new sampling weights, put once in the object store and loaded by every rollout worker
  evaluate   the clean reward of the held-out prompts (when eval.every says so, and at the end)
  checkpoint a full checkpoint (when checkpoint.every says so, and at the end)

`RunState` (actors/trainer/state.py) owns the iteration and the weights version; nothing else keeps them.

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

import logging
import sys
import time
from pathlib import Path

import ray
import torch

from actors.learner import LearnerLost
from actors.metrics import zero_counters
from actors.runtime import joined_cluster
from actors.trainer.accounting import iteration_work, rank_fidelity
from actors.trainer.pipeline import (
    Pipeline,
    adapters,
    new_draw,
    restore_in_flight,
    scores,
    settle,
    staleness_stats,
    submit,
)
from actors.trainer.report import count_work, eval_set, evaluate, finish, log_iteration
from actors.trainer.state import (
    Draw,
    LedgerRow,
    RunState,
    append_ledger,
    new_state,
    peek_resume,
    restore,
    save,
    trim_ledger,
)
from actors.trainer.world import World, parse, publish, start
from rlstitch.train.algorithms import algorithm
from rlstitch.train.config import RecipeConfig
from rlstitch.train.policy import VOCABULARY

log = logging.getLogger("rlstitch.trainer")


def run(recipe: str, argv: list[str] | None = None) -> dict:
    """Train a recipe with its config's algorithm (rlstitch/train/algorithms.py); returns the run summary
    (untrained and final clean reward, history of evaluations). A lost learner restarts the run from its latest
    checkpoint, at most checkpoint.restarts times."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(recipe, argv)
    restarts, attempt = cfg.checkpoint.restarts, 0
    while True:
        try:
            summary = train(recipe, argv)
            if joined_cluster() and cfg.log.metrics_linger_s > 0:
                # a job's driver exports its metrics only while it lives: keep the last ones up for a scrape
                log.info(f"keeping the driver's metrics up for {cfg.log.metrics_linger_s:.0f} s (log.metrics_linger_s)")
                time.sleep(cfg.log.metrics_linger_s)
            return summary
        except LearnerLost as e:
            attempt += 1
            if attempt > restarts:
                raise
            log.warning(f"learner lost ({e}); restart {attempt} of {restarts} from the latest checkpoint")
            argv = [*argv, "checkpoint.resume=true"]


def train(recipe: str, argv: list[str]) -> dict:
    """One attempt at the run: open (or resume) it and iterate to the end."""
    cfg, state, world, evals = open_run(recipe, argv)
    try:
        return Trainer(cfg, state, world, evals).train()
    finally:
        world.shutdown()


def open_run(recipe: str, argv: list[str] | None) -> tuple[RecipeConfig, RunState, World, tuple[list, list]]:
    """Config, actors and run state of a run: resumed from its last checkpoint if any, the rollout workers
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
        world.log.info(f"{cfg.recipe} mode={cfg.mode}{algorithm(cfg).describe(cfg)}: {cfg.iterations} iterations x "
                       f"{cfg.train.updates_per_iteration} steps, {cfg.batch_size} rollouts per iteration. {VOCABULARY}.")
        evals = eval_set(cfg)
        if state.iteration == 0:
            evaluate(world, state, *evals)  # the untrained generator
    except BaseException:
        world.shutdown()
        raise
    return cfg, state, world, evals


def due(every: int, iteration: int, total: int) -> bool:
    """Whether an evaluation / a checkpoint is due after `iteration` iterations (every `every`, and the last)."""
    return iteration == total or bool(every and iteration % every == 0)


class Trainer:
    """The iterations of one attempt at a run, phase by phase."""

    def __init__(self, cfg: RecipeConfig, state: RunState, world: World, evals: tuple[list, list]):
        algo = algorithm(cfg)
        self.cfg, self.state, self.world, self.evals, self.algo = cfg, state, world, evals, algo
        self.ledger = Path(cfg.out) / "ledger.jsonl"
        if ray.is_initialized():  # rate() needs the counter's series before its first increase
            zero_counters(("rlstitch_cost_gpu_s_total",), world.tags | {"role": "driver"})
        self.pipe = Pipeline(cfg.train.async_staleness, cfg.iterations, state.iteration,
                             lambda i, v: new_draw(cfg, state, algo, i, v), lambda d: submit(world, algo, d))

    def train(self) -> dict:
        """Iterate to the end of the run; returns the summary."""
        t_run = time.perf_counter()
        restore_in_flight(self.world, self.state, self.pipe)  # a checkpoint's draws, under their own weights
        self.publish()  # the weights the next draws are sampled with, kept while they are in flight
        trim_ledger(self.ledger, self.state.iteration)
        while self.state.iteration < self.cfg.iterations:
            t0 = time.perf_counter()
            d, job = self.draw()
            roll = self.roll_out(d, job)
            t1 = time.perf_counter()
            reward, parts = self.score(job, roll, d)
            t2 = time.perf_counter()
            stats, learned = self.learn(d, roll, reward)
            counted = self.account(d, roll, stats, reward)
            t3 = time.perf_counter()
            sync = self.publish()
            self.state.train_s += time.perf_counter() - t0
            self.record(d, learned)
            if reward is None:  # DRaFT: the learner's value of its rollouts
                reward = torch.tensor([stats["value"]])
            log_iteration(self.world, self.state, stats, parts, reward, roll["tau"], sync,
                          {"rollout_s": t1 - t0, "score_s": t2 - t1, "learn_s": t3 - t2,
                           "sync_s": time.perf_counter() - t3, "denoise_steps": roll["denoise_steps"]}, counted)
            self.evaluate()
            self.checkpoint()
        return finish(self.world, self.state, time.perf_counter() - t_run)

    def draw(self) -> tuple[Draw, dict]:
        """This iteration's draw (and those of the next k iterations, all submitted); pops this one's job."""
        return self.pipe.take(self.state.iteration, self.state.version)

    def roll_out(self, d: Draw, job: dict) -> dict:
        """Wait for the draw's rollouts."""
        return self.world.rollouts.collect(job["tasks"], d.version)

    def score(self, job: dict, roll: dict, d: Draw) -> tuple:
        """(reward, its parts): the streamed scores, or the batch scored now; (None, {}) for DRaFT."""
        return scores(self.world, self.algo, job, roll, d.prompts)

    def learn(self, d: Draw, roll: dict, reward) -> tuple[dict, list[float]]:
        """The learner group's update on the algorithm's batch (meanwhile the next k iterations roll out); the
        iteration and the weights version move on. Returns the stats and the update's epoch seconds."""
        cfg, state = self.cfg, self.state
        learn_at = time.time()
        stats = self.world.learner.update(self.algo.batch(cfg, roll, reward, d.prompts))
        learned = [round(learn_at, 3), round(time.time(), 3)]  # epoch seconds: a timeline's learner spans
        stats |= staleness_stats(roll["versions"], state.version, cfg.train.updates_per_iteration,
                                 cfg.train.async_staleness)
        state.iteration, state.version = state.iteration + 1, int(stats["step"])
        return stats, learned

    def account(self, d: Draw, roll: dict, stats: dict, reward) -> dict:
        """The iteration's counted work and cost (added to the run's), and the rank-fidelity diagnostic when due."""
        work = iteration_work(self.world, self.algo, roll, stats, len(d.prompts))
        return count_work(self.world, self.state, work) | rank_fidelity(self.world, self.algo, d, reward)

    def publish(self) -> dict:
        """Weight sync: the sampling weights of the current version, put once in the object store, loaded by the
        rollout workers between iterations, and kept while a draw sampled with them is in flight."""
        sync = publish(self.world, self.state.version)
        self.pipe.published(self.state.version, sync["published"])
        return sync

    def record(self, d: Draw, learned: list[float]) -> None:
        """Append the draw that reached the learner to the ledger (append-only, like metrics.jsonl)."""
        append_ledger(self.ledger, LedgerRow(d.iteration, d.version, self.state.version, d.prompts, d.seeds, learned))

    def evaluate(self) -> None:
        """When due: finish the work in flight (timed as training), then evaluate."""
        if due(self.cfg.eval.every, self.state.iteration, self.cfg.iterations):
            settle(self.world, self.state, self.pipe)
            evaluate(self.world, self.state, *self.evals)

    def checkpoint(self) -> None:
        """When due: a full checkpoint with the draws in flight and the weights they were sampled with."""
        if due(self.cfg.checkpoint.every, self.state.iteration, self.cfg.iterations):
            save(self.world, self.state, *adapters(self.pipe))
