"""Helpers of the tests that start a local Ray cluster on 127.0.0.1: the head, free ports and the metrics scrape.

The cluster is started with `ray start --block` as a child process and stopped by terminating that process
(never `ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from actors.simcluster import free_port, wait_for_dashboard  # noqa: F401

BIN = Path(sys.executable).parent


def run_watching_metrics(cmd: list[str], port: int, timeout: float, linger: float = 25,
                         **popen) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run cmd to its end while scraping the metrics endpoint every few seconds, then for `linger` seconds more.

    Returns the finished process and, per metric, the largest value seen: a gauge set by a short-lived process
    (a job's driver, a Ray Train worker) is only on the endpoint while that process lives."""
    from actors.metrics import scrape

    seen: dict[str, float] = {}

    def poll() -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                for k, v in scrape(r.read().decode()).items():
                    seen[k] = max(seen.get(k, 0.0), v)
        except OSError:
            pass

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{' '.join(cmd[:6])} ... ran over {timeout} s")
            poll()
            time.sleep(3)
        end = time.monotonic() + linger
        while time.monotonic() < end:
            poll()
            time.sleep(3)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()), seen


def submit_job(cmd: list[str], metrics_port: int, timeout: float, linger: float = 25,
               **popen) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """`ray job submit ...` via run_watching_metrics, retried while the head's job agent is not registered yet
    (it comes up a little after the dashboard answers)."""
    for _ in range(10):
        res, seen = run_watching_metrics(cmd, metrics_port, timeout, linger, **popen)
        if "No available agent to submit job" not in res.stdout + res.stderr:
            break
        time.sleep(5)
    return res, seen


@dataclass
class Head:
    """A `ray start --head --block` child process on 127.0.0.1 and its ports / temp dir."""

    proc: subprocess.Popen
    dashboard: int
    metrics: int
    temp: str
    env: dict

    def stop(self) -> None:
        """Terminate the head (`ray start --block` stops the processes it started)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start_head(tiny_dir: str | Path) -> Head:
    """A one-node cluster on 127.0.0.1 with every port explicit, its dashboard answering.

    Every port explicit: a session-wide test cluster (ray_local) already holds Ray's defaults, and a job agent
    that cannot bind its port leaves `ray job submit` answering "No available agent" forever."""
    gcs, dash, metrics_port, agent, client = (free_port() for _ in range(5))
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    env = os.environ | {"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
                        "RAY_metrics_report_interval_ms": "1000",  # short-lived processes export before they exit
                        "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
                        "RLSTITCH_TINY_DIR": str(tiny_dir), "RAY_USAGE_STATS_ENABLED": "0",
                        # the dashboard's and autoscaler's own exporters: off Ray's fixed defaults, which another
                        # cluster on the machine may hold
                        "DASHBOARD_METRIC_PORT": str(free_port()), "AUTOSCALER_METRIC_PORT": str(free_port())}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", f"--port={gcs}", f"--dashboard-port={dash}",
         f"--metrics-export-port={metrics_port}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--include-dashboard=true", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    head = Head(proc, dash, metrics_port, temp, env)
    try:
        wait_for_dashboard(dash, proc)
    except BaseException:
        head.stop()
        raise
    return head


def tiny_job(dashboard: int, root: Path, out: Path, stitch: str, *overrides: str) -> list[str]:
    """`ray job submit ... -- python recipes/nft_flux.py` on the tiny world, a few seconds per iteration."""
    return [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(root),
            "--", "python", "recipes/nft_flux.py", f"out={out}", f"reward.stitches=[{stitch}]",
            "rollout.prompts_per_iteration=2", "rollout.group_size=4", "train.micro_batch=8", "sampler.steps=6",
            "rollout.stop_window=[2,4]", "eval.num_prompts=4", "eval.grid=4", "lora.rank=4", *overrides]
