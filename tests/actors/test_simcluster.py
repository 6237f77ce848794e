"""On a simulated multi-node cluster (actors.simcluster: a head and role nodes, each its own raylet):
`python -m actors.doctor` names a resource no node offers and a node that died; an actor group asking for that
resource fails at start-up with the same message instead of waiting for a placement."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {"placement": {
    "rollout": {"num_workers": 1, "num_cpus": 0.5, "custom_resources": {"rollout": 1}},
    "value": {"num_workers": 1, "num_cpus": 0.5, "custom_resources": {"value": 1}},
    "learner": {"num_workers": 1, "num_cpus": 0.5, "custom_resources": {"learner": 1}},
}}
# An actor group on the cluster, in its own driver (this test process may hold the session's local Ray).
GROUP = """
import sys, time
import ray
from actors.group import ActorGroup
from rlstitch.placement import RoleSpec
ray.init(address=sys.argv[1], log_to_driver=False)
t = time.monotonic()
try:
    ActorGroup(object, RoleSpec(num_cpus=0.5, custom_resources={"learner": 1}, ready_timeout_s=20), role="learner")
except ValueError as e:
    print(f"ERROR after {time.monotonic() - t:.1f} s: {e}")
"""


def run(*args: str) -> subprocess.CompletedProcess:
    """A Python command of the repository, its output captured."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_doctor_and_groups_on_a_simulated_cluster(tmp_path, ray_local):
    from actors.simcluster import SimCluster

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    t0 = time.monotonic()
    with SimCluster({"rollout": {"CPU": 1, "rollout": 1}, "value": {"CPU": 1, "value": 1}}, connect=False) as sim:
        print(f"cluster up in {time.monotonic() - t0:.1f} s")
        address = sim.cluster.address
        group = run("-c", GROUP, address)
        assert "ERROR after" in group.stdout, group.stdout + group.stderr[-3000:]
        print(group.stdout)
        # at once, not after the group's 120 s ready timeout
        assert float(group.stdout.split("ERROR after ")[1].split(" s")[0]) < 30
        assert "learner: a worker needs {CPU: 0.5, learner: 1} and no node offers learner >= 1" in group.stdout
        assert "{CPU: 1, rollout: 1}" in group.stdout and "{CPU: 1, value: 1}" in group.stdout

        doc = run("-m", "actors.doctor", str(recipe), "--address", address)
        print(doc.stdout)
        assert doc.returncode == 1
        missing = [line for line in doc.stdout.splitlines() if line.startswith("MISSING")]
        assert len(missing) == 1 and "placement.learner: a worker needs {CPU: 0.5, learner: 1}" in missing[0]

        killed = sim.nodes["value"].node_id[:8]
        sim.kill_node("value")
        t1 = time.monotonic()
        sim.wait_dead(1)
        print(f"GCS marked the killed node dead in {time.monotonic() - t1:.1f} s")
        doc = run("-m", "actors.doctor", str(recipe), "--address", address)
        print(doc.stdout)
        dead = [line for line in doc.stdout.splitlines() if "is dead" in line]
        assert len(dead) == 1 and dead[0].startswith("MISSING: node ")
        assert f"({killed}) is dead: UNEXPECTED_TERMINATION" in dead[0]
        assert "placement.value: a worker needs {CPU: 0.5, value: 1} and no node offers value >= 1" in doc.stdout
    # The session's own driver still works after the simulated cluster is gone: Cluster.shutdown() resets the
    # process's internal KV, and every later placement check (which reads it) failed until SimCluster restored it.
    from ray.experimental.internal_kv import _internal_kv_get

    assert _internal_kv_get(b"rlstitch-probe") is None
    assert ray_local.get(ray_local.put(7)) == 7
    print(f"test done in {time.monotonic() - t0:.1f} s")
