"""`ray start --head` on 127.0.0.1, then `ray job submit --working-dir . -- python recipes/nft_flux.py ...` succeeds,
and the node's metrics export endpoint (127.0.0.1) carries every training metric with a non-zero value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_utils import start_head, submit_job, tiny_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ray_job_submit_runs_the_main_recipe(random_world, random_stitches, tmp_path):
    from actors.metrics import TRAINING_METRICS

    head = start_head(random_world)
    try:
        out = tmp_path / "run"
        cmd = tiny_job(head.dashboard, ROOT, out, random_stitches["tiny-flux"], "train.steps=2", "eval.every=1")
        job, seen = submit_job(cmd, head.metrics, timeout=1500, env=head.env, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and len(summary["history"]) == 3
        assert (out / "checkpoints" / "step-2" / "state.safetensors").is_file()
        assert any((out / "wandb").glob("offline-run-*"))
        missing = [n for n in TRAINING_METRICS if seen.get(n, 0) <= 0]
        assert not missing, f"metrics absent or zero on 127.0.0.1:{head.metrics}/metrics: {missing}; seen {seen}"
    finally:
        head.stop()
