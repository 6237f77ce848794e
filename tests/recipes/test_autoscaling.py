"""Autoscaling, behaviourally: a head offering no role resources, whose (fake) autoscaler launches the role node
types of cluster/aws.yaml and gcp.yaml (rlstitch.cluster_files.ROLE_NODE_TYPES, min 0), runs the tiny NFT recipe
submitted through the job API: role nodes appear while it runs, it succeeds, and each node is removed once it has
been idle for the idle timeout. A recipe asking for what no node type offers fails at once, launching nothing.
The node counts over time are printed (pytest -s) and asserted."""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest
from cluster_utils import tiny_job

ROOT = Path(__file__).resolve().parents[2]
IDLE_S = 12  # idle_timeout_minutes = 0.2: the autoscaler removes a node idle this long
JOB_TIMEOUT_S = 1500
DOWN_TIMEOUT_S = IDLE_S + 120  # idle timeout + the autoscaler's and raylets' own delays on a busy machine
DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def timeline_row(t: float, roles: list[str], status: str) -> str:
    """One line of the printed node-count timeline."""
    return f"{t:7.1f} s  {len(roles)} nodes  {' '.join(roles):40s} job {status}"


def removals(monitor_log: Path) -> dict[str, tuple[float, str]]:
    """{node id: (unix time, reason)} of every node the autoscaler terminated, from its log."""
    out = {}
    for line in monitor_log.read_text().splitlines():
        if "StandardAutoscaler: Terminating the node with id " in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            node = line.split("with id ")[1].split()[0]
            out[node] = (stamp, line.rsplit("(", 1)[1].rstrip(")"))
    return out


def entrypoint(argv: list[str]) -> str:
    """`ray job submit ... -- python recipes/nft_flux.py ...` -> the entrypoint, with this checkout's script."""
    recipe = argv[argv.index("--") + 1:]
    recipe[1] = str(ROOT / recipe[1])
    return " ".join(recipe)


@pytest.mark.slow
def test_role_nodes_scale_up_for_a_job_and_down_after_it(random_world, random_stitches, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from actors.simcluster import AutoscalingHead
    from rlstitch.cluster_files import ROLE_NODE_TYPES, fake_node_types

    # No --working-dir upload: the fake nodes share one session dir, and when one node's runtime-env agent deletes
    # the unpacked package, the workers of the others lose their cwd (seen: FileNotFoundError from os.getcwd in a
    # ValueActor, "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). Every process imports this checkout instead.
    env = {"RLSTITCH_TINY_DIR": str(random_world), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
           "RAY_worker_register_timeout_seconds": "600", "PYTHONPATH": str(ROOT)}
    # The head's 4 logical CPUs hold the job's driver and its helper actors. The learner's queues are pinned to the
    # driver's node (actors/learner.py): before that, Ray once placed a queue actor on a value node the autoscaler
    # launched one too many and was terminating as idle, and the job failed with it (1 run of 5).
    with AutoscalingHead(fake_node_types(cpus=1), head_cpus=4, idle_timeout_minutes=IDLE_S / 60, env=env) as head:
        assert head.alive_roles() == ["plain"]
        client = JobSubmissionClient(head.dashboard_url)
        job = lambda *more: tiny_job(head.dashboard, ROOT, tmp_path / "run", random_stitches["tiny-flux"],  # noqa: E731
                                     "train.steps=2", "eval.every=0", *more)

        # A value worker asking for a GPU, which no node type offers: the start-up check fails the job at once.
        t0 = time.monotonic()
        bad = client.submit_job(entrypoint=entrypoint(job("placement.value.num_gpus=1")))
        while client.get_job_status(bad).value not in DONE:
            assert head.alive_roles() == ["plain"] and time.monotonic() - t0 < 600
            time.sleep(1)
        logs = client.get_job_logs(bad)
        print(f"GPU job {client.get_job_status(bad).value} after {time.monotonic() - t0:.1f} s, no node launched")
        assert client.get_job_status(bad).value == "FAILED"
        assert "value: a worker needs {CPU: 0.25, GPU: 1, value: 1} and no node offers GPU >= 1" in logs, logs[-3000:]
        assert "node type value_gpu: {CPU: 1, value: 1}" in logs  # what the autoscaler could launch is listed

        t0, wall0 = time.monotonic(), time.time()
        good = client.submit_job(entrypoint=entrypoint(job()))
        seen: list[tuple[float, list[str], str]] = []
        roles: dict[str, str] = {}
        status, ended = None, None
        while True:
            t = time.monotonic() - t0
            status = client.get_job_status(good).value
            nodes = head.alive_nodes()
            roles |= nodes
            seen.append((t, sorted(nodes.values()), status))
            if len(seen) == 1 or seen[-1][1:] != seen[-2][1:]:  # the timeline: every change of nodes or status
                print(timeline_row(*seen[-1]), flush=True)
            if status in DONE and ended is None:
                ended = t
            if ended is not None and (seen[-1][1] == ["plain"] or t - ended > DOWN_TIMEOUT_S):
                break
            assert t < JOB_TIMEOUT_S, f"the job did not end within {JOB_TIMEOUT_S} s"
            time.sleep(1)
        logs = client.get_job_logs(good)
        (tmp_path / "job.log").write_text(logs)
        session_logs = Path(head.temp) / "session_latest" / "logs"
        gone, idle_since = removals(session_logs / "monitor.log"), head.last_actor_end()
        if status != "SUCCEEDED":  # keep every node's Ray logs for a look (the head's temp dir goes)
            shutil.copytree(session_logs, tmp_path / "ray-logs", dirs_exist_ok=True, ignore_dangling_symlinks=True)
    assert status == "SUCCEEDED", f"{logs[-3000:]}\nfull job log and Ray logs under {tmp_path}"
    during = [r for t, r, _ in seen if t <= ended]
    peak = max(len(r) for r in during)
    up = next(t for t, r, _ in seen if len(r) > 1)
    print(f"first role node {up:.1f} s after submission; peak {peak} nodes at "
          f"{next(t for t, r, _ in seen if len(r) == peak):.1f} s; job {status} at {ended:.1f} s; "
          f"head alone at {seen[-1][0]:.1f} s")
    idle_for = {}
    for node, (stamp, reason) in sorted(gone.items(), key=lambda kv: kv[1]):
        since = idle_since.get(node)
        idle_for[node] = stamp - since if since else None
        print(f"node ..{node[-5:]} ({roles.get(node, '?')}): removed at {stamp - wall0:.1f} s ({reason}); "
              + (f"its last actor ended at {since - wall0:.1f} s, idle {stamp - since:.1f} s" if since else
                 "never held an actor"))
    assert {r for r in roles.values()} - {"plain"} == {role for role, _, _ in ROLE_NODE_TYPES.values()}
    assert any({"rollout", "value", "learner"} <= set(r) for r in during)  # all roles' nodes up together
    assert seen[-1][1] == ["plain"], f"idle role nodes still alive {DOWN_TIMEOUT_S} s after the job: {seen[-1][1]}"
    assert set(gone) == set(roles) - {n for n, r in roles.items() if r == "plain"}  # every role node was removed
    assert all(reason == "idle" for _, reason in gone.values()), gone  # for being idle, not a crash or a cap
    # not before the idle timeout (1 s for the autoscaler's update period), nor long after it
    assert all(IDLE_S - 1 <= s <= DOWN_TIMEOUT_S for s in idle_for.values() if s is not None), idle_for
