"""actors.labels: the learner ranks' dashboard label (tests/recipes/test_observability.py sees it on the dashboard)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from actors import labels


@pytest.fixture
def train_worker(monkeypatch):
    """Ray Train's worker class, its __repr__ restored after the test."""
    from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

    monkeypatch.setattr(RayTrainWorker, "__repr__", RayTrainWorker.__repr__)
    return RayTrainWorker


@pytest.fixture
def in_bundle(monkeypatch):
    """Pretend to be a worker in bundle `k` of a placement group (the core worker's resource names)."""
    import ray

    def place(k: int) -> None:
        names = {f"CPU_group_{k}_ab12", "CPU_group_ab12", f"bundle_group_{k}_ab12", "bundle_group_ab12"}
        monkeypatch.setattr(ray._private.worker.global_worker, "core_worker",
                            SimpleNamespace(resource_ids=lambda: dict.fromkeys(names, [])), raising=False)

    return place


def test_the_hook_labels_train_workers_only_in_marked_processes(train_worker, monkeypatch, in_bundle):
    monkeypatch.delenv(labels.ROLE_ENV, raising=False)
    labels.label_train_worker()
    assert repr(train_worker()).startswith("<")  # every other worker of the job keeps Ray's repr
    monkeypatch.setenv(labels.ROLE_ENV, "learner")
    labels.label_train_worker()
    assert repr(train_worker()) == "learner"  # outside a placement group: the role alone
    in_bundle(3)
    assert repr(train_worker()) == "learner-3"


def test_a_label_that_is_not_the_rank_is_logged(monkeypatch, in_bundle, caplog):
    monkeypatch.setenv(labels.ROLE_ENV, "learner")
    in_bundle(1)
    with caplog.at_level(logging.WARNING, logger="actors.labels"):
        labels.check_rank(1)
        assert not caplog.records
        labels.check_rank(0)
    assert "labels learner world rank 0 as 'learner-1'" in caplog.text
