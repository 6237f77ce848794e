"""worker_bundle / fit_problem: a worker no node or node type can hold is a clear error naming the role, the
resource and what is offered; plain clusters drop role resources; unknown offers are not checked."""

from __future__ import annotations

import pytest

from rlstitch.config import ConfigError
from rlstitch.placement import RoleSpec, fit_problem, worker_bundle

ROLE_NODES = {"head": {"CPU": 1, "node:127.0.0.1": 1, "memory": 1e9},
              "rollout node": {"CPU": 2, "rollout": 1}, "value node": {"CPU": 1, "value": 1}}


def test_a_role_resource_no_node_offers_names_role_resource_and_offers():
    spec = RoleSpec(num_workers=1, num_cpus=1, custom_resources={"learner": 1})
    with pytest.raises(ConfigError) as err:
        worker_bundle(spec, "learner", ROLE_NODES)
    msg = str(err.value)
    assert msg.startswith("learner: a worker needs {CPU: 1, learner: 1} and no node offers learner >= 1")
    assert "rollout node: {CPU: 2, rollout: 1}" in msg and "value node: {CPU: 1, value: 1}" in msg
    assert "node:127.0.0.1" not in msg and "memory" not in msg  # Ray's own entries are not shown


def test_gpus_and_cpus_are_checked_per_node():
    assert "no node offers GPU >= 1" in fit_problem("rollout", {"CPU": 1, "GPU": 1, "rollout": 1}, ROLE_NODES)
    # 2 CPUs in all, but no node has them next to a value resource
    assert "no single node offers all of it" in fit_problem("value", {"CPU": 2, "value": 1}, ROLE_NODES)
    assert fit_problem("rollout", {"CPU": 2, "rollout": 1}, ROLE_NODES) is None


def test_strict_pack_needs_the_whole_group_on_one_node():
    spec = RoleSpec(num_workers=3, num_cpus=1, custom_resources={"rollout": 1}, strategy="STRICT_PACK")
    with pytest.raises(ConfigError, match=r"rollout: a worker needs \{CPU: 3, rollout: 3\}"):
        worker_bundle(spec, "rollout", ROLE_NODES)
    assert worker_bundle(RoleSpec(num_workers=3, num_cpus=1, custom_resources={"rollout": 1}), "rollout",
                         ROLE_NODES) == {"CPU": 1, "rollout": 1}


def test_plain_cluster_drops_role_resources_and_unknown_offers_keep_them(caplog):
    spec = RoleSpec(num_workers=2, num_cpus=0.5, custom_resources={"rollout": 1})
    assert worker_bundle(spec, "rollout", {"laptop": {"CPU": 4}}) == {"CPU": 0.5}
    assert "offers no 'rollout' resource" in caplog.text
    with pytest.raises(ConfigError, match="no node offers GPU >= 1"):  # but a GPU is still a GPU
        worker_bundle(RoleSpec(num_gpus=1), "learner", {"laptop": {"CPU": 4}})
    assert worker_bundle(spec, "rollout", None) == {"CPU": 0.5, "rollout": 1}  # an autoscaler of unknown types


def test_node_types_count_as_offers():
    offers = ROLE_NODES | {"node type learner_gpu": {"CPU": 8, "GPU": 8, "learner": 8}}
    spec = RoleSpec(num_workers=2, num_cpus=1, num_gpus=1, custom_resources={"learner": 1})
    assert worker_bundle(spec, "learner", offers) == {"CPU": 1, "GPU": 1, "learner": 1}
