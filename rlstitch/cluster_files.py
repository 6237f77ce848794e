"""Load and check the cluster files under cluster/ (`ray up` configs and KubeRay manifests) without Ray.

Roles are Ray custom resources: recipes request them under `custom_resources` keys
(`placement: {rollout: {num_gpus: 1, custom_resources: {rollout: 1}}}`) and every cluster file must
offer them on some node type (`available_node_types[*].resources` for `ray up`, the JSON string in
`rayStartParams.resources` for KubeRay).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rlstitch.placement import ROLE_RESOURCES

ROLES = frozenset(ROLE_RESOURCES)  # the custom resources every cluster file offers
BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "TPU", "memory", "object_store_memory"})
KUBERAY_API_VERSION = "ray.io/v1"
KUBERAY_KINDS = frozenset({"RayCluster", "RayJob"})
WORKER_GROUP_FIELDS = ("groupName", "replicas", "minReplicas", "maxReplicas")

# The one source of the role node types: every `ray up` file (cluster/aws.yaml, cluster/gcp.yaml) declares
# exactly these, and the autoscaling test launches them (fake_node_types). Each offers one unit of its role per
# GPU and scales from zero (min_workers 0); CPUs and instance types are the cloud's own.
ROLE_NODE_TYPES = {  # name: (role resource, GPUs = role units per node, max_workers)
    "rollout_gpu": ("rollout", 8, 4),
    "value_gpu": ("value", 1, 4),
    "learner_gpu": ("learner", 8, 2),
}


# ----------------------------------------------------------------------------------------- loading


def load_cluster_file(path: str | Path) -> dict:
    """Read one YAML cluster file into a dict, with an error that names the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"cluster file not found: {path}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    return doc


def is_kuberay(doc: Mapping) -> bool:
    """True when the document looks like a KubeRay manifest rather than a `ray up` config."""
    return "apiVersion" in doc or doc.get("kind") in KUBERAY_KINDS


# ---------------------------------------------------------------------------------- ray up schema


def _ray_package_dir() -> Path:
    """Directory of the installed `ray` package, found without importing Ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("ray is not installed; the autoscaler schema ships inside the ray package")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    """Raw text of ray/autoscaler/ray-schema.json from the installed Ray."""
    path = _ray_package_dir() / "autoscaler" / "ray-schema.json"
    if not path.is_file():
        raise FileNotFoundError(f"Ray's autoscaler schema is missing: {path}")
    return path.read_text()


def autoscaler_schema() -> dict:
    """The JSON schema `ray up` validates cluster configs against (a fresh copy per call)."""
    return json.loads(_schema_text())


def _format_error(error: Any) -> str:
    """One line per jsonschema error: the dotted path, then the message."""
    where = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    return f"{where}: {error.message}"


def schema_errors(config: Mapping) -> list[str]:
    """Every violation of Ray's autoscaler schema in `config`, as readable lines."""
    import jsonschema

    validator = jsonschema.Draft7Validator(autoscaler_schema())
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: [str(p) for p in e.absolute_path])
    return [_format_error(e) for e in errors]


def node_type_errors(config: Mapping) -> list[str]:
    """Consistency checks Ray does after the schema: head type exists, min <= max workers."""
    node_types = config.get("available_node_types")
    if not isinstance(node_types, Mapping):
        return []
    errors = []
    head = config.get("head_node_type")
    if head not in node_types:
        errors.append(f"head_node_type: {head!r} is not one of available_node_types {sorted(node_types)}")
    for name, spec in node_types.items():
        if not isinstance(spec, Mapping):
            continue
        low, high = spec.get("min_workers", 0), spec.get("max_workers", 0)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(f"available_node_types.{name}: min_workers {low} > max_workers {high}")
    return errors


def role_node_type_errors(config: Mapping) -> list[str]:
    """Where a `ray up` file's role node types differ from ROLE_NODE_TYPES (names, role units, GPUs, bounds)."""
    types = config.get("available_node_types") or {}
    errors = [f"available_node_types: no {name!r} (rlstitch.cluster_files.ROLE_NODE_TYPES)"
              for name in ROLE_NODE_TYPES if name not in types]
    for name, spec in types.items():
        res = dict(spec.get("resources") or {})
        roles = {r: res[r] for r in ROLES if res.get(r)}
        if name not in ROLE_NODE_TYPES:
            errors += [f"available_node_types.{name}: offers {roles} but is not a role node type"] if roles else []
            continue
        role, gpus, high = ROLE_NODE_TYPES[name]
        want = ({role: gpus}, gpus, 0, high)
        have = (roles, res.get("GPU"), spec.get("min_workers", 0), spec.get("max_workers"))
        if have != want:
            errors.append(f"available_node_types.{name}: (role units, GPU, min_workers, max_workers) = {have}, "
                          f"ROLE_NODE_TYPES says {want}")
    return errors


def fake_node_types(cpus: float = 1) -> dict[str, dict]:
    """ROLE_NODE_TYPES as node types of Ray's fake multi-node provider on a CPU-only machine: the same names,
    role units and bounds, `cpus` CPUs and no GPUs each."""
    return {name: {"resources": {"CPU": cpus, role: gpus}, "min_workers": 0, "max_workers": high}
            for name, (role, gpus, high) in ROLE_NODE_TYPES.items()}


def validate_cluster_file(path: str | Path) -> dict:
    """Validate a `ray up` file against Ray's schema; return it or raise ValueError listing errors."""
    config = load_cluster_file(path)
    errors = schema_errors(config) + node_type_errors(config)
    if errors:
        raise ValueError(f"{path} is not a valid Ray cluster file:\n  - " + "\n  - ".join(errors))
    return config


# ------------------------------------------------------------------------------------------ KubeRay


def _cluster_spec(doc: Mapping) -> tuple[Any, str]:
    """The RayCluster spec inside a RayCluster or RayJob document, with its dotted path."""
    spec = doc.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    if doc.get("kind") == "RayJob":
        return spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    return spec, "spec"


def _missing(node: Any, path: str, fields: Sequence[str]) -> list[str]:
    """Messages for each of `fields` absent from the mapping at `path`."""
    if not isinstance(node, Mapping):
        return [f"{path}: missing (expected a mapping)"]
    return [f"{path}.{name}: missing" for name in fields if node.get(name) in (None, "")]


def _pod_errors(group: Mapping, path: str, need_limits: bool) -> list[str]:
    """Check template.spec.containers (non-empty; the Ray container with resource limits)."""
    template = group.get("template")
    spec = template.get("spec") if isinstance(template, Mapping) else None
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    cpath = f"{path}.template.spec.containers"
    if not isinstance(containers, list) or not containers:
        return [f"{cpath}: missing (expected a non-empty list)"]
    first = containers[0]
    errors = _missing(first, f"{cpath}[0]", ("name", "image"))
    resources = first.get("resources") if isinstance(first, Mapping) else None
    if need_limits and not (isinstance(resources, Mapping) and resources.get("limits")):
        errors.append(f"{cpath}[0].resources.limits: missing")
    return errors


def _worker_group_errors(group: Any, path: str) -> list[str]:
    """Check one worker group: name, replica bounds, containers with resource limits."""
    errors = _missing(group, path, WORKER_GROUP_FIELDS)
    if not isinstance(group, Mapping):
        return errors
    low, now, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
    if all(isinstance(v, int) for v in (low, now, high)) and not low <= now <= high:
        errors.append(f"{path}: expected minReplicas <= replicas <= maxReplicas, got {low}/{now}/{high}")
    return errors + _pod_errors(group, path, need_limits=True)


def kuberay_errors(doc: Mapping) -> list[str]:
    """Every structural problem of a RayCluster / RayJob manifest, each naming its field path."""
    errors = []
    if doc.get("apiVersion") != KUBERAY_API_VERSION:
        errors.append(f"apiVersion: expected {KUBERAY_API_VERSION!r}, got {doc.get('apiVersion')!r}")
    kind = doc.get("kind")
    if kind not in KUBERAY_KINDS:
        return errors + [f"kind: expected one of {sorted(KUBERAY_KINDS)}, got {kind!r}"]
    if kind == "RayJob":
        errors += _missing(doc.get("spec"), "spec", ("entrypoint", "rayClusterSpec"))
    spec, path = _cluster_spec(doc)
    if not isinstance(spec, Mapping):
        return errors if kind == "RayJob" else errors + [f"{path}: missing (expected a mapping)"]
    head = spec.get("headGroupSpec")
    if not isinstance(head, Mapping):
        errors.append(f"{path}.headGroupSpec: missing")
    else:
        errors += _pod_errors(head, f"{path}.headGroupSpec", need_limits=False)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return errors + [f"{path}.workerGroupSpecs: missing (expected a non-empty list)"]
    for i, group in enumerate(groups):
        errors += _worker_group_errors(group, f"{path}.workerGroupSpecs[{i}]")
    return errors


def validate_kuberay(doc: Mapping) -> Mapping:
    """Check a KubeRay RayCluster/RayJob manifest; return it or raise ValueError naming bad fields."""
    errors = kuberay_errors(doc)
    if errors:
        name = doc.get("metadata", {}).get("name", "?") if isinstance(doc.get("metadata"), Mapping) else "?"
        raise ValueError(f"KubeRay {doc.get('kind')} {name!r} is invalid:\n  - " + "\n  - ".join(errors))
    return doc


# ---------------------------------------------------------------------------------------- resources


def parse_resources_param(value: Any) -> dict:
    """Decode KubeRay's rayStartParams.resources ('"{\\"rollout\\": 1}"' or a plain JSON object)."""
    for _ in range(3):
        if isinstance(value, Mapping):
            return dict(value)
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"rayStartParams.resources is not JSON: {value!r}") from exc
    raise ValueError(f"rayStartParams.resources must encode a JSON object, got {value!r}")


def _kuberay_groups(doc: Mapping) -> list[Mapping]:
    """The head group and all worker groups of a RayCluster / RayJob manifest."""
    spec, _ = _cluster_spec(doc)
    if not isinstance(spec, Mapping):
        return []
    groups = [spec.get("headGroupSpec")] + list(spec.get("workerGroupSpecs") or [])
    return [g for g in groups if isinstance(g, Mapping)]


def node_resources(cluster: Mapping) -> dict[str, dict]:
    """Resources each node type / group declares: {name: {resource: amount}} (CPU/GPU included)."""
    if is_kuberay(cluster):
        out = {}
        for group in _kuberay_groups(cluster):
            params = group.get("rayStartParams") or {}
            name = group.get("groupName", "head")
            out[name] = parse_resources_param(params["resources"]) if "resources" in params else {}
        return out
    node_types = cluster.get("available_node_types") or {}
    return {name: dict(spec.get("resources") or {}) for name, spec in node_types.items()}


def provided_resources(cluster: Mapping) -> set[str]:
    """Custom resource names (roles) offered by any node type / worker group of a cluster file."""
    names = {key for res in node_resources(cluster).values() for key, amount in res.items() if float(amount) > 0}
    return names - BUILTIN_RESOURCES


def head_num_cpus(cluster: Mapping) -> float | None:
    """CPUs the head node advertises to Ray (None when the file leaves it to auto-detection)."""
    if is_kuberay(cluster):
        spec, _ = _cluster_spec(cluster)
        params = ((spec or {}).get("headGroupSpec") or {}).get("rayStartParams") or {}
        return float(params["num-cpus"]) if "num-cpus" in params else None
    head = (cluster.get("available_node_types") or {}).get(cluster.get("head_node_type"), {})
    cpus = (head.get("resources") or {}).get("CPU")
    return None if cpus is None else float(cpus)


def _walk(node: Any) -> Iterator[tuple[Any, Any]]:
    """Yield every (key, value) pair of every mapping nested anywhere in `node`."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        for item in node:
            yield from _walk(item)


def requested_resources(config: Any) -> set[str]:
    """Names of all custom resources a recipe config requests under any `custom_resources` key."""
    found = set()
    for key, value in _walk(config):
        if key == "custom_resources" and isinstance(value, Mapping):
            found.update(str(name) for name in value)
    return found


def missing_resources(cluster: Mapping, requested: set[str]) -> set[str]:
    """Requested custom resources that no node type of `cluster` offers."""
    return set(requested) - provided_resources(cluster)
