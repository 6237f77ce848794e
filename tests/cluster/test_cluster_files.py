"""The cluster files under cluster/ are valid and offer every role the recipes request."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from rlstitch import cluster_files as cf

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_UP_FILES = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY_FILES = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]
ALL_FILES = RAY_UP_FILES + KUBERAY_FILES


def _ids(paths: list[Path]) -> list[str]:
    """Short test ids: the path relative to cluster/."""
    return [str(p.relative_to(CLUSTER)) for p in paths]


def _recipe_requests() -> set[str]:
    """Custom resources requested by any YAML under recipes/configs/, or the fixed role set if none."""
    configs = sorted((ROOT / "recipes" / "configs").rglob("*.y*ml"))
    found = set()
    for path in configs:
        for doc in yaml.safe_load_all(path.read_text()):
            found |= cf.requested_resources(doc)
    return found or set(cf.ROLES)


def _write(tmp_path: Path, doc: dict) -> Path:
    """Dump a cluster config to a temporary YAML file."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# ---------------------------------------------------------------------------------------- ray up


def test_schema_ships_with_ray():
    """The schema comes from the installed Ray and describes cluster files."""
    schema = cf.autoscaler_schema()
    assert {"cluster_name", "provider"} <= set(schema["required"])
    assert "available_node_types" in schema["properties"]


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=_ids(RAY_UP_FILES))
def test_ray_up_file_validates(path):
    """aws.yaml and gcp.yaml pass Ray's own autoscaler schema and node-type checks."""
    config = cf.validate_cluster_file(path)
    assert config["cluster_name"]
    assert {"rollout_gpu", "value_gpu", "learner_gpu"} <= set(config["available_node_types"])


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=_ids(RAY_UP_FILES))
def test_ray_up_roles_and_dashboard(path):
    """Each role node type offers its role with GPUs; the dashboard stays on localhost."""
    config = cf.load_cluster_file(path)
    for role in cf.ROLES:
        res = config["available_node_types"][f"{role}_gpu"]["resources"]
        assert res[role] >= 1 and res["GPU"] == res[role]
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    total = sum(t.get("max_workers", 0) for t in config["available_node_types"].values())
    assert config["max_workers"] == total


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=_ids(RAY_UP_FILES))
def test_ray_up_node_types_are_the_one_source(path):
    """aws.yaml and gcp.yaml declare exactly ROLE_NODE_TYPES (as the autoscaling test launches them)."""
    config = cf.load_cluster_file(path)
    assert cf.role_node_type_errors(config) == []
    fake = cf.fake_node_types(cpus=1)
    for name, spec in fake.items():
        role_units = {r: v for r, v in spec["resources"].items() if r in cf.ROLES}
        real = config["available_node_types"][name]
        assert role_units == {r: v for r, v in real["resources"].items() if r in cf.ROLES}
        assert (spec["min_workers"], spec["max_workers"]) == (real["min_workers"], real["max_workers"]) == \
            (0, real["max_workers"])


def test_node_types_that_drift_are_named():
    """A changed bound, a missing role type and a second type offering a role are each named."""
    config = cf.load_cluster_file(RAY_UP_FILES[0])
    types = config["available_node_types"]
    types["rollout_gpu"]["max_workers"] = 5
    types["extra"] = copy.deepcopy(types.pop("value_gpu"))
    errors = cf.role_node_type_errors(config)
    assert any(e.startswith("available_node_types.rollout_gpu: (role units, GPU, min_workers, max_workers) = "
                            "({'rollout': 8}, 8, 0, 5)") for e in errors)
    assert "available_node_types: no 'value_gpu' (rlstitch.cluster_files.ROLE_NODE_TYPES)" in errors
    assert "available_node_types.extra: offers {'value': 1} but is not a role node type" in errors


def test_misspelled_key_fails(tmp_path):
    """A misspelled top-level key is rejected and named in the error."""
    config = cf.load_cluster_file(RAY_UP_FILES[0])
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(ValueError, match="max_worker"):
        cf.validate_cluster_file(_write(tmp_path, config))


def test_wrong_type_fails(tmp_path):
    """A wrongly typed field is rejected with its dotted path."""
    config = cf.load_cluster_file(RAY_UP_FILES[1])
    config["available_node_types"]["rollout_gpu"]["resources"]["GPU"] = "eight"
    with pytest.raises(ValueError, match=r"available_node_types\.rollout_gpu\.resources\.GPU"):
        cf.validate_cluster_file(_write(tmp_path, config))


def test_unknown_head_type_fails(tmp_path):
    """A head_node_type that is not a node type is rejected."""
    config = cf.load_cluster_file(RAY_UP_FILES[0])
    config["head_node_type"] = "ray.head.default"
    with pytest.raises(ValueError, match="head_node_type"):
        cf.validate_cluster_file(_write(tmp_path, config))


def test_bad_yaml_is_clear(tmp_path):
    """Unparseable YAML and missing files give errors that name the file."""
    path = tmp_path / "broken.yaml"
    path.write_text("cluster_name: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        cf.load_cluster_file(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        cf.load_cluster_file(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_ids(KUBERAY_FILES))
def test_kuberay_structure(path):
    """The KubeRay manifests have head/worker groups, replica bounds and GPU limits."""
    doc = cf.load_cluster_file(path)
    cf.validate_kuberay(doc)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(cf.ROLES)
    for group in groups.values():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_rayjob_fields():
    """The RayJob runs the FLUX NFT recipe from a working_dir and tears the cluster down after."""
    doc = cf.load_cluster_file(KUBERAY_FILES[1])
    assert doc["spec"]["entrypoint"].startswith("python recipes/nft_flux.py")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and runtime_env["env_vars"]


@pytest.mark.parametrize(
    ("path", "mutate", "field"),
    [
        (
            KUBERAY_FILES[0],
            lambda d: d["spec"]["workerGroupSpecs"][1].pop("maxReplicas"),
            r"spec\.workerGroupSpecs\[1\]\.maxReplicas",
        ),
        (
            KUBERAY_FILES[0],
            lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("resources"),
            r"workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]\.resources\.limits",
        ),
        (KUBERAY_FILES[0], lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
        (KUBERAY_FILES[1], lambda d: d["spec"].pop("entrypoint"), r"spec\.entrypoint"),
        (
            KUBERAY_FILES[1],
            lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"),
            r"spec\.rayClusterSpec\.headGroupSpec",
        ),
    ],
    ids=["max-replicas", "limits", "api-version", "entrypoint", "head-group"],
)
def test_broken_kuberay_fails(path, mutate, field):
    """A manifest missing a required field fails and the error names that field's path."""
    doc = copy.deepcopy(cf.load_cluster_file(path))
    mutate(doc)
    with pytest.raises(ValueError, match=field):
        cf.validate_kuberay(doc)


def test_resources_param_forms():
    """KubeRay's quoted JSON string and a plain JSON object both decode."""
    assert cf.parse_resources_param('"{\\"rollout\\": 1}"') == {"rollout": 1}
    assert cf.parse_resources_param('{"value": 2}') == {"value": 2}
    with pytest.raises(ValueError):
        cf.parse_resources_param("rollout=1")


# ------------------------------------------------------------------------------- roles, head CPUs


def test_requested_resources_walks_nested_config():
    """custom_resources keys are collected at any depth, inside mappings and lists."""
    config = {
        "placement": {"rollout": {"num_gpus": 1, "custom_resources": {"rollout": 1}}},
        "stages": [{"value": {"custom_resources": {"value": 1, "learner": 0.5}}}],
        "custom_resources": None,
    }
    assert cf.requested_resources(config) == {"rollout", "value", "learner"}
    assert cf.requested_resources({"a": [1, "x"]}) == set()


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_every_requested_role_is_provided(path):
    """Every custom resource any recipe config requests is offered by some node type of this file."""
    requested = _recipe_requests() | set(cf.ROLES)
    missing = cf.missing_resources(cf.load_cluster_file(path), requested)
    assert not missing, f"{path.name} offers no node type with {sorted(missing)}"


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_head_has_zero_cpus(path):
    """The head advertises 0 CPUs, so no task or actor is ever scheduled on it."""
    config = cf.load_cluster_file(path)
    assert cf.head_num_cpus(config) == 0
    if not cf.is_kuberay(config):
        assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])


def test_resources_offered_at_zero_and_a_null_head_group_are_handled():
    """A role offered with amount 0 is not provided; a KubeRay head group left null reads as auto-detected CPUs."""
    ray_up = {"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}}, "gpu": {"resources": {"GPU": 1, "rollout": 0, "learner": 1}}}}
    assert cf.provided_resources(ray_up) == {"learner"}
    assert cf.head_num_cpus({"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": {"headGroupSpec": None}}) is None
