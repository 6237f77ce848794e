"""Ray start-up shared by every recipe: join the cluster under `ray job submit`, else a local instance."""

from __future__ import annotations

import math
import os

import ray

from actors.labels import SETUP_HOOK


def joined_cluster() -> bool:
    """Whether this driver joins a cluster that outlives it (RAY_ADDRESS) rather than a local instance of its own."""
    return bool(os.environ.get("RAY_ADDRESS"))


def init_ray(num_cpus: int | None = None, need: float = 0.0) -> None:
    """Connect to the job's cluster (RAY_ADDRESS, set by `ray job submit`) or start a local Ray on 127.0.0.1.

    A local instance gets `num_cpus` logical CPUs, else max(cores, need): `need` is the most CPUs the job's
    actors ask for at once, so e.g. 4 stats workers of 1 CPU start on a 2-core laptop (they share the cores)
    instead of waiting for a placement that can never happen."""
    if ray.is_initialized():
        return
    # The driver and its workers must agree: a local instance started with token auth rejects workers
    # that were told auth is disabled.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")},
           # names the learner ranks on the dashboard (a no-op in every other worker)
           "worker_process_setup_hook": SETUP_HOOK}
    if joined_cluster():
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
    else:
        num_cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(need))
        # address="local": always a fresh instance, never a cluster someone else started on this machine
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 runtime_env=env)
