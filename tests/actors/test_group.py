"""ActorGroup: waits that time out with a clear error, impossible bundles, shutdown that frees the placement group."""

from __future__ import annotations

import inspect
import time

import pytest

from actors.group import ActorGroup
from rlstitch.placement import RoleSpec


def napper():
    """An actor class defined in a function, so Ray pickles it by value (workers cannot import test modules)."""

    class Napper:
        def __init__(self, rank: int = 0, world_size: int = 1):
            self.rank = rank

        def nap(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    return Napper


def test_group_waits_have_a_default_timeout():
    for method in (ActorGroup.call, ActorGroup.map):
        assert inspect.signature(method).parameters["timeout"].default is not None


@pytest.mark.slow
def test_group_waits_time_out_clearly_and_shutdown_twice_frees_the_group(ray_local):
    import ray
    from ray.util import placement_group_table

    group = ActorGroup(napper(), RoleSpec(num_workers=1, num_cpus=0.5), role="stats")
    try:
        assert group.call("nap", 0, timeout=600) == [0]
        # the dashboard's Actors page shows this repr (tests/recipes/test_observability.py sees it there)
        assert ray.get(group.workers[0].__ray_call__.remote(lambda self: (type(self).__name__, repr(self)))) == \
            ("Napper", "stats-0")
        with pytest.raises(TimeoutError, match=r"stats workers did not finish 'nap' within 0\.5 s"):
            group.call("nap", 60, timeout=0.5)
        with pytest.raises(TimeoutError, match=r"stats workers did not finish 'nap' within 0\.5 s"):
            group.map("nap", [60], timeout=0.5)
    finally:
        group.shutdown()
        group.shutdown()  # a second shutdown (e.g. from a driver's cleanup) is harmless
    assert placement_group_table(group.pg)["state"] == "REMOVED"


@pytest.mark.slow
def test_a_worker_that_reserves_nothing_is_a_clear_error(ray_local):
    with pytest.raises(ValueError, match=r"value workers would reserve no resources"):
        ActorGroup(napper(), RoleSpec(num_cpus=0, num_gpus=0), role="value")


@pytest.mark.slow
def test_a_learner_group_that_cannot_start_frees_its_queues(ray_local, tmp_path, monkeypatch):
    """Ranks that fail to build their learner (no models under tiny_dir) raise, and leave no queue actors behind."""
    import ray
    from ray.util.queue import Queue

    import actors.learner as L
    from rlstitch.train.config import RecipeConfig

    made = []  # a handle to each queue's actor (Queue.shutdown drops its own)

    def queue(**options) -> Queue:
        q = Queue(**options)
        made.append(q.actor)
        return q

    monkeypatch.setattr(L, "Queue", queue)
    with pytest.raises(RuntimeError, match="learner rank 0 failed in 'ready'"):
        L.LearnerGroup(RecipeConfig(), RoleSpec(num_workers=1, num_cpus=1), {"run": "fail"}, tiny_dir=str(tmp_path),
                       storage=tmp_path / "ray_train")
    assert len(made) == 2  # one inbox, the outbox
    for handle in made:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.qsize.remote(), timeout=60)


def test_autoscaler_node_types_come_from_the_cluster_file(monkeypatch, tmp_path):
    """Without node types in the GCS (autoscaler v1), the cluster file names them; none is None."""
    from pathlib import Path

    from ray._private.state import state

    from actors.group import node_types

    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    monkeypatch.setenv("RLSTITCH_CLUSTER_FILE", str(Path(__file__).resolve().parents[2] / "cluster" / "aws.yaml"))
    types = node_types()
    assert types["learner_gpu"] == {"CPU": 192, "GPU": 8, "learner": 8} and types["head"] == {"CPU": 0}
    monkeypatch.setenv("RLSTITCH_CLUSTER_FILE", str(tmp_path / "none.yaml"))
    assert node_types() is None


@pytest.mark.parametrize(("mapping", "expected"), [
    ({}, False),  # no report yet
    ({"7787e088": "node_" + "7787e088a0b6905582863801992416d89156d1745016b0cc0adc77fd"}, False),  # read-only
    ({"fff00000": "ray.head.default", "fff00001": "rollout_gpu"}, True),  # an autoscaler with node types
])
def test_autoscaling_tells_a_real_autoscaler_from_the_read_only_one(monkeypatch, mapping, expected):
    import json

    import ray.experimental.internal_kv as kv

    from actors.group import autoscaling

    status = {"autoscaler_report": {"node_type_mapping": mapping}} if mapping else {}
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: json.dumps(status).encode())
    assert autoscaling() is expected
