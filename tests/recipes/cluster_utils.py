"""Helpers of the tests that start a local Ray cluster on 127.0.0.1: free ports and the metrics scrape."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import urllib.request


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
