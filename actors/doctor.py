"""Check a Ray cluster for what a recipe needs, before a long job fails halfway.

    python -m actors.doctor recipes/configs/nft_flux/tiny.yaml [--address auto] [--path /mnt/weights/...]
    python -m actors.doctor --observe http://127.0.0.1:9090 [--since 3600]

Reports: nodes (and an autoscaler's node types) and their resources; every role of the recipe's `placement`
section (workers x CPUs / GPUs / custom resources) against what the nodes offer (one worker must fit one node
or node type: rlstitch.placement.fit_problem, the check every actor group makes at start-up); dead nodes (one
that died unexpectedly is a problem); weights paths seen from every node; versions of torch / ray / deepspeed /
diffusers on every node. Exits 1 when anything is missing.
With --observe, instead: every panel of cluster/grafana/*.json queried through that Prometheus over the last
--since seconds (actors/observe.py); exits 1 when a panel shows nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ray
import yaml

from actors.group import cluster_offers
from actors.runtime import init_ray
from rlstitch.placement import brief, fit_problem


def placement_roles(config: dict) -> dict[str, dict]:
    """role -> {num_workers, num_cpus, num_gpus, custom_resources} from a recipe config's `placement`."""
    roles = {}
    for role, spec in (config.get("placement") or {}).items():
        if isinstance(spec, dict):
            roles[role] = {"num_workers": spec.get("num_workers", 1), "num_cpus": spec.get("num_cpus", 1),
                           "num_gpus": spec.get("num_gpus", 0), "custom_resources": spec.get("custom_resources") or {}}
    return roles


def weight_paths(config: dict) -> list[str]:
    """Every config value under a key ending in `path` or `_dir` that names a local path."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and v and (k.endswith("path") or k.endswith("_dir")) and v.startswith("/"):
                    found.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found


def role_problems(roles: dict[str, dict], total: dict[str, float],
                  offers: dict[str, dict[str, float]] | None = None) -> list[str]:
    """What the cluster lacks for each role: a worker no node (type) of `offers` can hold (a missing custom
    resource, a GPU on no node), too few CPUs / GPUs in all. `offers` defaults to one node holding `total`."""
    offers = {"all nodes together": total} if offers is None else offers
    problems = []
    need: dict[str, float] = {}
    for role, s in roles.items():
        one = {"CPU": s["num_cpus"], "GPU": s["num_gpus"], **s["custom_resources"]}
        problem = fit_problem(f"placement.{role}", {k: v for k, v in one.items() if v}, offers)
        if problem:
            problems.append(problem)
        need["CPU"] = need.get("CPU", 0) + s["num_workers"] * s["num_cpus"]
        need["GPU"] = need.get("GPU", 0) + s["num_workers"] * s["num_gpus"]
    for res, amount in need.items():
        if amount > total.get(res, 0):
            problems.append(f"the recipe's roles need {amount:g} {res} in all, the cluster has {total.get(res, 0):g} "
                            f"(lower num_workers / num_{res.lower()}s or add nodes; autoscaling clusters may grow)")
    return problems


def dead_nodes() -> tuple[list[str], list[str]]:
    """(report lines, problems) for the nodes the GCS lists as dead: one that died unexpectedly (killed,
    preempted, lost its network) is a problem, one that was stopped or scaled down is only reported."""
    from ray.core.generated.common_pb2 import NodeDeathInfo

    lines, problems = [], []
    for n in ray.nodes():
        if n["Alive"]:
            continue
        reason = NodeDeathInfo.Reason.Name(n.get("DeathReason", 0))
        text = f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]}) is dead: {reason} {n.get('DeathReasonMessage', '')}"
        expected = reason in ("EXPECTED_TERMINATION", "AUTOSCALER_DRAIN_IDLE")
        (lines if expected else problems).append(text if expected else
                                                 text + " (its actors are gone; restart the node or replace it)")
    return lines, problems


@ray.remote(num_cpus=0)
def node_report(paths: list[str]) -> dict:
    """Versions and weight paths as seen from one node."""
    import importlib.metadata as md
    import os
    import socket

    versions = {}
    for pkg in ("torch", "ray", "deepspeed", "diffusers", "open_clip_torch", "rlstitch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"host": socket.gethostname(), "versions": versions, "paths": {p: os.path.exists(p) for p in paths}}


def per_node(paths: list[str]) -> list[dict]:
    """node_report on every alive node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [node_report.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes]
    return ray.get(refs, timeout=120)


def diagnose(config: dict) -> tuple[list[str], list[str]]:
    """(report lines, problems) for a connected cluster and a recipe config."""
    total = ray.cluster_resources()
    offers = cluster_offers()
    lines = [f"cluster resources: {dict(sorted(total.items()))}"]
    lines += [f"{name}: {brief(res)}" for name, res in sorted((offers or {}).items())]
    roles = placement_roles(config)
    for role, s in roles.items():
        lines.append(f"role {role}: {s['num_workers']} x (CPU {s['num_cpus']}, GPU {s['num_gpus']}, "
                     f"custom {s['custom_resources']})")
    problems = role_problems(roles, total, offers)
    gone, dead = dead_nodes()
    lines += gone
    problems += dead
    paths = weight_paths(config)
    reports = per_node(paths)
    for r in reports:
        lines.append(f"node {r['host']}: {r['versions']}")
        problems += [f"node {r['host']}: weights path {p} not found" for p, ok in r["paths"].items() if not ok]
        problems += [f"node {r['host']}: {pkg} is not installed" for pkg, v in r["versions"].items()
                     if v is None and pkg in ("torch", "ray")]
    for pkg in ("torch", "ray", "deepspeed", "diffusers"):
        seen = {r["versions"][pkg] for r in reports}
        if len(seen) > 1:
            problems.append(f"{pkg} versions differ between nodes: {sorted(map(str, seen))}")
    return lines, problems


def observe_main(prom: str, since: float) -> int:
    """--observe: the panel table; exit status 1 when a panel returns nothing plausible."""
    import time

    from actors.observe import observe, report

    end = time.time()
    rows = observe(prom, end - since, end, step=max(since / 500, 2.0))
    print(report(rows))
    bad = [r for r in rows if r["problem"]]
    print(f"MISSING: {len(bad)} of {len(rows)} panels show nothing plausible" if bad else
          f"OK: all {len(rows)} panels return data")
    return 1 if bad else 0


def main(argv=None) -> int:
    """CLI: prints the report and the problems; exit status 1 when there are problems."""
    p = argparse.ArgumentParser(description="Check a Ray cluster against a recipe config")
    p.add_argument("config", nargs="?", help="a recipe YAML (its `placement` section is checked)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--observe", metavar="PROMETHEUS_URL", help="check every Grafana panel's query on this Prometheus")
    p.add_argument("--since", type=float, default=3600.0, help="with --observe: seconds of history to query")
    a = p.parse_args(argv)
    if a.observe:
        return observe_main(a.observe, a.since)
    if not a.config:
        p.error("give a recipe config, or --observe PROMETHEUS_URL")
    config = yaml.safe_load(Path(a.config).read_text()) or {}
    if a.address:
        ray.init(address=a.address, log_to_driver=False)
    else:
        init_ray()
    lines, problems = diagnose(config)
    print("\n".join(lines))
    print("\n".join(f"MISSING: {x}" for x in problems) if problems else "OK: the cluster has what the recipe needs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
