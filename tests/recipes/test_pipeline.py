"""The pipelined loop's bookkeeping (actors/trainer/pipeline.py) with a fake rollout side and learner, no Ray: what is
submitted when, with which weights, and that every draw reaches the learner exactly once, also across a resume."""

from __future__ import annotations

import pytest
import torch

from actors.trainer.pipeline import Pipeline, staleness_stats
from actors.trainer.state import Draw


class FakeRun:
    """Draws numbered prompts, records every submission and update in order; the learner steps once per update."""

    def __init__(self, k: int, total: int, start: int = 0, version: int = 0, next_seed: int = 0):
        self.events: list[tuple] = []
        self.trained: list[Draw] = []
        self.version, self.seed = version, next_seed
        self.pipe = Pipeline(k, total, start, self.draw, self.submit)

    def draw(self, iteration: int, version: int) -> Draw:
        self.seed += 1
        return Draw(iteration, [f"p{self.seed}"], [self.seed], [2], version)

    def submit(self, d: Draw) -> str:
        self.events.append(("submit", d.iteration, d.version))
        return f"job{d.iteration}"

    def iterate(self, iteration: int) -> None:
        d, job = self.pipe.take(iteration, self.version)
        assert job == f"job{d.iteration}"
        self.trained.append(d)
        self.events.append(("update", iteration))
        self.version += 1
        self.pipe.published(self.version, f"w{self.version}")


def run(k: int, total: int) -> FakeRun:
    r = FakeRun(k, total)
    r.pipe.published(0, "w0")
    for i in range(total):
        r.iterate(i)
    return r


@pytest.mark.parametrize("k", [0, 1, 2])
def test_every_draw_reaches_the_learner_once_with_bounded_staleness(k):
    r = run(k, 7)
    assert [d.iteration for d in r.trained] == list(range(7))
    assert sorted(s for d in r.trained for s in d.seeds) == list(range(1, 8))  # each seed once, none lost
    # iteration n is sampled with the weights after iteration n - k - 1 (the initial ones for the first k + 1)
    assert [d.version for d in r.trained] == [max(0, n - k) for n in range(7)]
    assert r.pipe.queue == type(r.pipe.queue)() and r.pipe.next == 7  # nothing drawn past the run's end


@pytest.mark.parametrize("k", [0, 1, 2])
def test_the_next_k_iterations_are_submitted_before_the_update(k):
    ev = run(k, 6).events
    for n in range(6):
        submitted = [e[1] for e in ev[: ev.index(("update", n))] if e[0] == "submit"]
        assert submitted == list(range(min(n + k, 5) + 1))  # n's draw and the next k, no more


def test_resume_from_in_flight_draws_replays_the_uninterrupted_run():
    k, total, stop = 2, 7, 3
    straight = run(k, total)
    first = FakeRun(k, total)
    first.pipe.published(0, "w0")
    for i in range(stop):
        first.iterate(i)
    draws, weights = first.pipe.in_flight()
    assert [d["iteration"] for d in draws] == [3, 4] and set(weights) == {d["version"] for d in draws} == {1, 2}
    assert weights == {1: "w1", 2: "w2"}  # the weights they were sampled with, kept for the checkpoint

    second = FakeRun(k, total, start=stop, version=first.version, next_seed=first.seed)
    second.pipe.resubmit([Draw(**d) for d in draws])
    second.pipe.published(second.version, f"w{second.version}")
    for i in range(stop, total):
        second.iterate(i)
    assert first.trained + second.trained == straight.trained


def test_out_of_order_use_is_a_clear_error():
    r = FakeRun(1, 4)
    with pytest.raises(RuntimeError, match="expected 0"):
        r.pipe.resubmit([Draw(2, ["p"], [1], [2], 0)])
    r.iterate(0)
    with pytest.raises(RuntimeError, match="holds iteration 1"):
        r.pipe.take(2, r.version)


def test_staleness_stats_count_iterations_per_sample():
    s = staleness_stats(torch.tensor([4, 4, 2, 2]), step=4, per_iteration=2, k=2)
    assert s == {"staleness_mean": 0.5, "staleness_max": 1.0, "staleness_0": 0.5, "staleness_1": 0.5,
                 "staleness_2": 0.0}


def test_a_lost_learner_restarts_the_run_from_its_checkpoint(monkeypatch, tmp_path):
    """LearnerLost ends one attempt; the next resumes (checkpoint.resume=true), at most checkpoint.restarts times;
    other errors are not retried."""
    from actors.learner import LearnerLost
    from actors.trainer import loop

    attempts = []

    def train(recipe, argv, fail=2):
        attempts.append(list(argv))
        if len(attempts) <= fail:
            raise LearnerLost("rank 0 lost")
        return {"steps": 3}

    monkeypatch.setattr(loop, "train", train)
    assert loop.run("nft_flux", [f"out={tmp_path}"]) == {"steps": 3}
    assert attempts[0] == [f"out={tmp_path}"] and attempts[2][-1] == "checkpoint.resume=true"
    attempts.clear()
    with pytest.raises(LearnerLost):
        loop.run("nft_flux", [f"out={tmp_path}", "checkpoint.restarts=1"])
    assert len(attempts) == 2
    monkeypatch.setattr(loop, "train", lambda *a: (_ for _ in ()).throw(RuntimeError("rank 0 failed in 'update'")))
    with pytest.raises(RuntimeError, match="failed in 'update'"):
        loop.run("nft_flux", [f"out={tmp_path}"])


def test_trim_ledger_keeps_the_iterations_before_the_checkpoint(tmp_path):
    import json

    from actors.trainer.state import trim_ledger

    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "seeds": [i]}) + "\n" for i in (0, 1, 2, 3)))
    trim_ledger(path, 2)  # a learner lost after iteration 3, resumed from the checkpoint after iteration 2
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1]
    trim_ledger(tmp_path / "none.jsonl", 0)  # a fresh run: nothing to trim
    assert not (tmp_path / "none.jsonl").exists()
