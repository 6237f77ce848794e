"""One placement helper for every actor group (rollout, value, learner, stats): the driver reads like
single-process code — `group.call("method", ...)` runs on every worker, `group.map(...)` spreads items.

A role's RoleSpec (rlstitch/placement.py) becomes a placement group here (ActorGroup), Ray Train's
ScalingConfig (scaling_config) or a Serve replica's ray_actor_options (actor_options), always through `bundle`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlstitch.cluster_files import load_cluster_file, node_resources
from rlstitch.placement import RoleSpec, worker_bundle

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 1800.0  # default longest wait for a group call; pass timeout= to change it


def get_within(refs, timeout: float | None, what: str, fix: str):
    """ray.get, or after `timeout` seconds a TimeoutError saying what did not answer and where to look."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} within {timeout:g} s; see `ray status` and the worker logs (`ray logs`), "
                           f"or {fix}") from None


def bundle(spec: RoleSpec, role: str) -> dict[str, float]:
    """The resources of one worker, checked against what the cluster offers (rlstitch.placement.worker_bundle):
    a request no node or node type can hold fails here, at start-up, instead of waiting for a placement."""
    return worker_bundle(spec, role, cluster_offers())


def cluster_offers() -> dict[str, dict[str, float]] | None:
    """{node / node type: resources} the cluster offers or may launch; None when that cannot be known.

    The alive nodes, plus the autoscaler's node types when Ray or a cluster file says them (node_types). An
    autoscaler whose node types are unknown gives None (the check is skipped); so does RLSTITCH_PLACEMENT_CHECK=0."""
    if os.environ.get("RLSTITCH_PLACEMENT_CHECK", "1") == "0":
        return None
    offers = {f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]})": n["Resources"]
              for n in ray.nodes() if n["Alive"]}
    types = node_types()
    if types is not None:
        return offers | {f"node type {name}": res for name, res in types.items()}
    if autoscaling():
        log.warning("the cluster autoscales but its node types are unknown (set RLSTITCH_CLUSTER_FILE to its "
                    "cluster file): worker resources go unchecked")
        return None
    return offers


def node_types() -> dict[str, dict[str, float]] | None:
    """The autoscaler's node types and their resources: from the GCS (autoscaler v2, KubeRay), else the cluster
    file RLSTITCH_CLUSTER_FILE (default ~/ray_bootstrap_config.yaml, which `ray up` leaves on the head); None
    when neither has them."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return {g.name: dict(g.resources) for g in config.node_group_configs}
    path = Path(os.environ.get("RLSTITCH_CLUSTER_FILE", "~/ray_bootstrap_config.yaml")).expanduser()
    return node_resources(load_cluster_file(path)) if path.is_file() else None


def autoscaling() -> bool:
    """True when an autoscaler with configured node types runs (not the read-only one every head runs, whose
    node types are the live nodes, named node_<node id>)."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(not re.fullmatch(r"node_[0-9a-f]{56}", t) for t in mapping.values())


def scaling_config(spec: RoleSpec, role: str = "learner"):
    """Ray Train's ScalingConfig for a role: num_workers workers, each reserving the role's bundle."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.num_gpus > 0,
                         resources_per_worker=bundle(spec, role), placement_strategy=spec.strategy)


def actor_options(spec: RoleSpec, role: str = "value") -> dict:
    """ray_actor_options of a Serve replica (checked like every bundle)."""
    one = bundle(spec, role)
    return {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
            "resources": {k: v for k, v in one.items() if k not in ("CPU", "GPU")}}


def with_role_repr(actor_cls, role: str):
    """actor_cls whose instances repr as "<role>-<rank>": the Ray dashboard's Repr column and log prefix name the role."""

    def __init__(self, *args, rank: int = 0, **kwargs):
        self._role_rank = f"{role}-{rank}"
        actor_cls.__init__(self, *args, rank=rank, **kwargs)

    return type(actor_cls.__name__, (actor_cls,), {"__init__": __init__, "__repr__": lambda self: self._role_rank,
                                                   "__qualname__": actor_cls.__qualname__, "__doc__": actor_cls.__doc__})


class ActorGroup:
    """N actors of one class in one placement group."""

    def __init__(self, actor_cls, spec: RoleSpec, *args, role: str = "worker", label: str | None = None, **kwargs):
        """`label` (default: the role) names the workers on the dashboard, "<label>-<rank>"."""
        spec.validate(role)
        self.role, self.spec = role, spec
        one = bundle(spec, role)
        if not one:
            raise ValueError(f"{role} workers would reserve no resources (num_cpus=0, num_gpus=0): set "
                             f"{role}.num_cpus or {role}.num_gpus above 0")
        self.pg = placement_group([dict(one) for _ in range(spec.num_workers)], strategy=spec.strategy)
        try:
            ray.get(self.pg.ready(), timeout=spec.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"cannot place {spec.num_workers} {role} workers of {one} within {spec.ready_timeout_s:.0f} s; "
                f"the cluster has {ray.cluster_resources()} (available {ray.available_resources()}). "
                f"Lower {role}.num_workers / num_gpus or add nodes (see `ray status`)."
            ) from None
        remote = ray.remote(with_role_repr(actor_cls, label or role))
        self.workers = [
            remote.options(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                resources={k: v for k, v in one.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
                # a restarted worker re-runs the tasks its predecessor lost (bounded by the restarts)
                max_restarts=spec.max_restarts, max_task_retries=-1 if spec.max_restarts else 0,
            ).remote(*args, rank=k, world_size=spec.num_workers, **kwargs)
            for k in range(spec.num_workers)
        ]

    def __len__(self) -> int:
        return len(self.workers)

    def call_async(self, method: str, *args, **kwargs) -> list:
        """Start `method` on every worker; returns the object refs."""
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call(self, method: str, *args, timeout: float | None = CALL_TIMEOUT_S, **kwargs) -> list:
        """Run `method` on every worker and wait for all results (TimeoutError after `timeout` seconds)."""
        return self._wait(self.call_async(method, *args, **kwargs), method, timeout)

    def map(self, method: str, items: Sequence[Any], timeout: float | None = CALL_TIMEOUT_S) -> list:
        """Spread items round-robin over the workers (one call per item); results in item order."""
        refs = [getattr(self.workers[k % len(self.workers)], method).remote(x) for k, x in enumerate(items)]
        return self._wait(refs, method, timeout)

    def _wait(self, refs: list, method: str, timeout: float | None) -> list:
        """Every result, or a TimeoutError naming this role and method."""
        return get_within(refs, timeout, f"{self.role} workers did not finish {method!r}", "pass a longer timeout")

    def shutdown(self) -> None:
        """Kill the workers and free the placement group."""
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
