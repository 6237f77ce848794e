"""Role labels for the learner ranks on the Ray dashboard (the Actors page's Repr column and the log prefix).

ActorGroup labels its own actors with `with_role_repr`. Ray Train creates the learner ranks itself, as
`RayTrainWorker` actors. Ray records an actor's repr once, right after the actor's creation task, which is before
Ray Train assigns world ranks, and no Ray API changes the repr later. So `init_ray` installs `label_train_worker`
as the job's worker setup hook. In the processes that LearnerGroup marks with ROLE_ENV, the hook gives
RayTrainWorker a repr of "<role>-<placement bundle>". Ray Train numbers ranks by node and then by GPU id, so the
bundle index equals the world rank on one node. `check_rank` logs the ranks where the two differ.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)
ROLE_ENV = "RLSTITCH_TRAIN_ROLE"  # set on the Ray Train workers only (RunConfig.worker_runtime_env)
SETUP_HOOK = "actors.labels.label_train_worker"


def label_train_worker() -> None:
    """Worker setup hook: in a process marked with ROLE_ENV, RayTrainWorker reprs as "<role>-<bundle index>"."""
    role = os.environ.get(ROLE_ENV)
    if not role:
        return
    try:  # Ray Train has no public hook for its worker class; without this import the default repr stays
        from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker
    except Exception as e:  # a setup hook that raises would stop the worker
        log.warning("cannot label Ray Train workers %r on the dashboard: %r", role, e)
        return
    RayTrainWorker.__repr__ = lambda self: train_label(role)


def bundle_index() -> int | None:
    """This worker's placement-group bundle index, or None outside a bundle (or where Ray's internals differ)."""
    try:  # internal: the core worker lists the bundle's resources as bundle_group_<index>_<placement group id>
        import ray

        names = ray._private.worker.global_worker.core_worker.resource_ids()
        found = {int(m[1]) for name in names if (m := re.fullmatch(r"bundle_group_(\d+)_[0-9a-f]+", name))}
    except Exception:  # Ray calls the repr while creating the actor: a label must never fail it
        return None
    return found.pop() if len(found) == 1 else None


def train_label(role: str) -> str:
    """The repr of a Ray Train worker of `role`: "<role>-<bundle index>", or just the role outside a bundle."""
    k = bundle_index()
    return role if k is None else f"{role}-{k}"


def check_rank(rank: int) -> None:
    """Log the rank when the dashboard label (numbered by placement bundle) shows another number."""
    role, k = os.environ.get(ROLE_ENV), bundle_index()
    if role and k is not None and k != rank:
        log.warning("the Ray dashboard labels learner world rank %d as %r (Ray Train assigned ranks by node and "
                    "GPU id after the actors were created)", rank, f"{role}-{k}")
