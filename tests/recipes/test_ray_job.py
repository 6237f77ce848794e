"""`ray start --head` on 127.0.0.1, then `ray job submit --working-dir . -- python recipes/nft_flux.py ...` succeeds,
and the node's metrics export endpoint (127.0.0.1) carries every training metric with a non-zero value.

The cluster is started with `ray start --block` as a child process and stopped by terminating that process
(never `ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from cluster_utils import free_port, submit_job

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for_dashboard(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll the job API until it answers (or the head process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the dashboard on 127.0.0.1:{port} did not come up within {timeout} s")


@pytest.mark.slow
def test_ray_job_submit_runs_the_main_recipe(random_world, random_stitches, tmp_path):
    from actors.metrics import TRAINING_METRICS

    # Every port explicit: a session-wide test cluster (ray_local) already holds Ray's defaults, and a job agent
    # that cannot bind its port leaves `ray job submit` answering "No available agent" forever.
    gcs, dash, metrics_port, agent, client = (free_port() for _ in range(5))
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    env = os.environ | {"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
                        "RAY_metrics_report_interval_ms": "2000",  # short-lived processes export before they exit
                        "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
                        "RLSTITCH_TINY_DIR": str(random_world), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", f"--port={gcs}", f"--dashboard-port={dash}",
         f"--metrics-export-port={metrics_port}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--include-dashboard=true", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_dashboard(dash, head)
        out = tmp_path / "run"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--", "python", "recipes/nft_flux.py", "train.steps=2", f"out={out}",
               f"reward.stitches=[{random_stitches['tiny-flux']}]", "rollout.prompts_per_iteration=2",
               "rollout.group_size=4", "train.micro_batch=8", "sampler.steps=6", "rollout.stop_window=[2,4]",
               "eval.num_prompts=4", "eval.every=1", "eval.grid=4", "lora.rank=4"]
        job, seen = submit_job(cmd, metrics_port, timeout=1500, env=env, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and len(summary["history"]) == 3
        assert (out / "checkpoints" / "step-2" / "state.safetensors").is_file()
        assert any((out / "wandb").glob("offline-run-*"))
        missing = [n for n in TRAINING_METRICS if seen.get(n, 0) <= 0]
        assert not missing, f"metrics absent or zero on 127.0.0.1:{metrics_port}/metrics: {missing}; seen {seen}"
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
