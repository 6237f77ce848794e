"""The doctor names what a recipe needs and the cluster lacks."""

from __future__ import annotations

import pytest

from actors.doctor import placement_roles, role_problems, weight_paths

CONFIG = {
    "placement": {
        "rollout": {"num_workers": 2, "num_cpus": 1, "num_gpus": 0, "custom_resources": {"rollout": 1}},
        "value": {"num_workers": 1, "num_cpus": 1},
    },
    "model": {"path": "/nonexistent/weights/flux-dev"},
}


def test_role_problems_name_missing_resource_and_shortfall():
    roles = placement_roles(CONFIG)
    assert roles["value"]["num_gpus"] == 0 and roles["rollout"]["custom_resources"] == {"rollout": 1}
    problems = role_problems(roles, {"CPU": 2.0})
    assert any("placement.rollout: a worker needs {CPU: 1, rollout: 1} and no node offers rollout >= 1" in p
               for p in problems)
    assert any("need 3 CPU in all, the cluster has 2" in p for p in problems)
    assert role_problems(roles, {"CPU": 8.0, "rollout": 4.0}) == []
    assert weight_paths(CONFIG) == ["/nonexistent/weights/flux-dev"]


@pytest.mark.slow
def test_doctor_on_a_local_cluster(ray_local, tmp_path, capsys):
    import yaml

    from actors.doctor import main

    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(CONFIG))
    assert main([str(f)]) == 1
    out = capsys.readouterr().out
    assert "MISSING: placement.rollout: a worker needs {CPU: 1, rollout: 1} and no node offers rollout >= 1" in out
    assert "weights path /nonexistent/weights/flux-dev not found" in out
    assert "torch" in out
