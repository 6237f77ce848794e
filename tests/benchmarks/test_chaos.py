"""benchmarks/chaos.py: the kill schedule, the report, and (slow) one short chaos run on a simulated 3-node cluster
in which a rollout worker, a value actor, a learner rank and the rollout+value node are lost (issue #29, items 1-3):
the run completes, no prompt is lost or trained on twice, and its final weights equal the undisturbed run's."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from chaos import KINDS, report, schedule


def test_schedule_is_seeded_and_covers_every_kind():
    plan = schedule(8, seed=0)
    assert plan == schedule(8, seed=0) and plan != schedule(8, seed=1)
    assert Counter(p["kind"] for p in plan) == {k: 2 for k in KINDS}
    assert all(p["wait_iterations"] == 1 and 0.2 <= p["delay_s"] <= 2.0 for p in plan)


def write_ledger(out, rows) -> None:
    out.mkdir(parents=True)
    (out / "ledger.jsonl").write_text("".join(json.dumps({"prompts": p, "seeds": s}) + "\n" for p, s in rows))


def test_report_counts_lost_and_repeated_prompts(tmp_path):
    write_ledger(tmp_path / "ref", [(["a", "b"], [1, 2]), (["c"], [3])])
    write_ledger(tmp_path / "chaos", [(["a", "b"], [1, 2]), (["a"], [1])])  # c lost, a twice
    (tmp_path / "chaos.log").write_text("learner lost (x); restart 1 of 3 from the latest checkpoint\n")
    kills = [{"kind": "learner", "recovery_s": 4.0}, {"kind": "rollout", "recovery_s": None}]
    r = report({"status": 0, "wall_s": 10.0, "curve": []}, {"status": 0, "wall_s": 15.0, "kills": kills, "curve": []},
               tmp_path / "ref", tmp_path / "chaos", 2, schedule(3, 0))
    assert (r["prompts_lost"], r["prompts_twice"], r["prompts_expected"]) == (1, 1, 3)
    assert (r["kills_planned"], r["kills_injected"], r["kills_survived"]) == (3, 2, 1)  # one never recovered
    assert r["learner_restarts"] == 1 and r["overhead"] == 0.5 and r["final_weights_equal"] is False


@pytest.mark.slow
def test_a_run_survives_one_kill_of_each_kind(tmp_path, monkeypatch):
    from chaos import main

    # the runs are subprocesses on the committed tiny world (with its StitchVM), not a session fixture's world
    monkeypatch.delenv("RLSTITCH_TINY_DIR", raising=False)

    r = main(["--kills", "4", "--steps", "20", "--seed", "3", "--out", str(tmp_path), "--timeout", "600",
              "rollout.prompts_per_iteration=2", "rollout.group_size=4", "train.micro_batch=8"])
    assert r["exit_status"] == {"undisturbed": 0, "chaos": 0}
    assert r["by_kind"] == {k: 1 for k in KINDS}
    assert r["kills_injected"] == r["kills_survived"] == 4
    assert r["learner_restarts"] == 1
    # Ray restarted the killed rollout worker and value actor, and the three actors of the lost node
    assert r["actor_restarts"]["rollout"] >= 2 and r["actor_restarts"]["value"] >= 3, r["actor_restarts"]
    assert r["prompts_lost"] == 0 and r["prompts_twice"] == 0 and r["prompts_expected"] == 20 * 2 * 4
    assert r["final_weights_equal"] is True
