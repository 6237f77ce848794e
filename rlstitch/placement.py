"""The one placement model, Ray-free: what a role (rollout, value, learner, stats) asks the cluster for.

ActorGroup places a RoleSpec as a placement group, the learner groups turn it into Ray Train's ScalingConfig,
Serve deployments into ray_actor_options (actors/group.py); every recipe config holds RoleSpecs and checks them
here, so the checks and the custom resource names exist once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from rlstitch.config import ConfigError

log = logging.getLogger(__name__)
ROLE_RESOURCES = ("rollout", "value", "learner")  # the custom resources of cluster/ node types
STATS_RESOURCES = ("value",)  # stats workers share the value nodes, or take none
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_HIDDEN = ("node:", "accelerator_type:", "memory", "object_store_memory")  # Ray's own entries, not shown in errors


@dataclass
class RoleSpec:
    """How many workers a role gets and what each one reserves (GPU fractions allowed)."""

    num_workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"rollout": 1}: used when the cluster has it
    strategy: str = "PACK"  # placement strategy of the group's bundles
    ready_timeout_s: float = 120.0  # how long to wait for the cluster to fit the group
    # how often Ray restarts a lost worker (killed process, lost node), re-running the tasks it lost on the new
    # one (every task carries its inputs and weights); 0: never (a lost worker fails the run), -1: forever
    max_restarts: int = 10

    @property
    def cpus(self) -> float:
        """CPUs the whole group reserves."""
        return self.num_workers * self.num_cpus

    def problems(self, role: str) -> Iterator[str]:
        """One message per impossible request, each naming the knob."""
        if self.num_workers < 1:
            yield f"{role}.num_workers must be >= 1, got {self.num_workers}"
        if self.num_cpus < 0 or self.num_gpus < 0:
            yield f"{role}: num_cpus and num_gpus must be >= 0"
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            yield f"{role}.num_gpus={self.num_gpus}: fractions are allowed only below 1"
        if self.max_restarts < -1:
            yield f"{role}.max_restarts must be >= -1 (-1: forever), got {self.max_restarts}"

    def validate(self, role: str) -> None:
        """Clear errors for impossible requests."""
        for problem in self.problems(role):
            raise ValueError(problem)


def check_resources(role: str, resources: dict, allowed: tuple[str, ...] = ROLE_RESOURCES) -> None:
    """Custom resource names must be ones the cluster files define for this role, with positive amounts."""
    bad = sorted(set(resources) - set(allowed))
    if bad:
        raise ConfigError(f"{role}.custom_resources has {bad}; allowed: {list(allowed) or 'none'} "
                          f"(set {role}.custom_resources={{}} to place anywhere)")
    if any(v <= 0 for v in resources.values()):
        raise ConfigError(f"{role}.custom_resources amounts must be positive, got {dict(resources)}")


def check_strategy(role: str, strategy: str) -> None:
    """A placement strategy Ray knows."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"{role}.strategy={strategy!r} is not one of {STRATEGIES}")


def _rollout_role() -> RoleSpec:
    return RoleSpec(num_workers=2, num_cpus=0.5, custom_resources={"rollout": 1})


def _value_role() -> RoleSpec:
    return RoleSpec(num_workers=1, num_cpus=1.0, custom_resources={"value": 1})


@dataclass
class Placement:
    """The inference recipes' roles: rollout actors (particles / prompts) and value actors (the value pool)."""

    rollout: RoleSpec = field(default_factory=_rollout_role)
    value: RoleSpec = field(default_factory=_value_role)

    def validate(self) -> None:
        """Sizes and custom resource names the cluster files know."""
        for role in ("rollout", "value"):
            spec: RoleSpec = getattr(self, role)
            spec.validate(f"placement.{role}")
            check_resources(f"placement.{role}", spec.custom_resources)


def worker_bundle(spec: RoleSpec, role: str, offers: dict[str, dict[str, float]] | None) -> dict[str, float]:
    """One worker's resources, checked against what the cluster's nodes (or node types) offer.

    `offers` is {node or node type: its resources}, or None when unknown (an autoscaler whose node types
    cannot be read): then the request is kept as it is, unchecked. On a plain cluster (no node offers any
    role resource: a laptop, `ray start` without --resources) the role's custom resources are dropped with
    a warning, so the same recipe runs there; on a cluster with role nodes a resource nobody offers is an error."""
    b = {"CPU": spec.num_cpus, "GPU": spec.num_gpus}
    plain = offers is not None and not any(o.get(r) for o in offers.values() for r in ROLE_RESOURCES)
    for name, amount in spec.custom_resources.items():
        if plain and not any(o.get(name) for o in offers.values()):
            log.warning("cluster offers no %r resource (no role nodes); %s workers go on any node", name, role)
        else:
            b[name] = amount
    b = {k: v for k, v in b.items() if v}
    if offers is not None:
        need = {k: v * spec.num_workers for k, v in b.items()} if spec.strategy == "STRICT_PACK" else b
        problem = fit_problem(role, need, offers)
        if problem:
            raise ConfigError(problem)
    return b


def fit_problem(role: str, need: dict[str, float], offers: dict[str, dict[str, float]]) -> str | None:
    """Why no single node / node type of `offers` can hold `need`, naming the role, the resource and what is
    offered; None when one can."""
    if any(all(o.get(k, 0) >= v for k, v in need.items()) for o in offers.values()):
        return None
    short = [k for k, v in need.items() if max((o.get(k, 0) for o in offers.values()), default=0) < v]
    what = (f"no node offers {', '.join(f'{k} >= {need[k]:g}' for k in short)}" if short
            else "no single node offers all of it")
    shown = "; ".join(f"{name}: {brief(o)}" for name, o in sorted(offers.items())) or "no nodes"
    return (f"{role}: a worker needs {brief(need)} and {what}. The cluster offers {shown}. "
            f"Change {role}.num_cpus / num_gpus / custom_resources, or add a node (type) offering it "
            f"(cluster/README.md); RLSTITCH_PLACEMENT_CHECK=0 skips this check")


def brief(resources: dict[str, float]) -> str:
    """{CPU: 2, rollout: 1} without Ray's internal node:/memory entries."""
    keep = {k: v for k, v in resources.items() if not k.startswith(_HIDDEN)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
