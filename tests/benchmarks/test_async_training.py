"""benchmarks/async_training.py's report and timeline parsing."""

from __future__ import annotations

from async_training import summarise, timeline_spans

from actors.trainer.state import LedgerRow


def run(points: list[tuple[float, float]], iterations: int, train_s: float) -> dict:
    """A recipe summary whose history is (wall_s, clean_reward) points."""
    return {"iterations": iterations, "train_s": train_s, "timings": {"learn_s": 1.0},
            "history": [{"wall_s": w, "step": k, "clean_reward": r} for k, (w, r) in enumerate(points)]}


def test_throughput_speedup_and_time_to_the_sync_final_reward():
    report = summarise({0: run([(0, 0.45), (50, 0.47), (100, 0.50)], 20, 100.0),
                        1: run([(0, 0.45), (30, 0.49), (60, 0.51)], 20, 60.0),
                        2: run([(0, 0.45), (40, 0.46), (80, 0.48)], 20, 80.0)})
    assert report["throughput"] == {"0": 0.2, "1": 0.3333, "2": 0.25}
    assert report["speedup"]["1"] == round(0.3333 / 0.2, 3)
    assert report["time_to_sync_final_ratio"] == {"0": 1.0, "1": 0.6, "2": None}  # staleness 2 never gets to 0.50
    assert report["final_reward"] == {"0": 0.5, "1": 0.51, "2": 0.48}


def test_timeline_spans_keep_the_roles_inside_the_window():
    def ev(cat, ts, dur, tid):
        return {"ph": "X", "cat": cat, "ts": ts * 1e6, "dur": dur * 1e6, "tid": tid}

    events = [ev("task::RolloutWorker.sample", 101, 2, "w1"), ev("task::ValueActor.value_of", 103, 1, "w2"),
              ev("task::_QueueActor.get", 102, 1, "w4"), ev("task::RolloutWorker.sample", 90, 2, "w1"),
              ev("task::RolloutWorker.__init__", 100.5, 0.1, "w1"), {"ph": "M", "name": "thread_name", "tid": "w1"}]
    ledger = [LedgerRow(learned=[102.0, 103.5]), LedgerRow(learned=[95.0, 96.0])]
    assert timeline_spans(events, ledger, 100.0, 110.0) == [("learner", "learner", 2.0, 3.5), ("rollout", "w1", 1.0, 3.0),
                                                            ("value", "w2", 3.0, 4.0)]
