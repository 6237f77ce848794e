"""Observability with the real tools: a Prometheus server (127.0.0.1) scraping a local Ray cluster through Ray's
generated scrape config while the tiny NFT recipe and the stitch build run under `ray job submit`; every panel
query of cluster/grafana/*.json returns plausible series; the Ray dashboard in headless Chromium shows the job
and the actors by role.

Needs Debian's `prometheus` and `chromium` (`make setup` installs them as root); skipped, saying so, without them.
RLSTITCH_OBSERVE_DOCS=docs copies the screenshots there (the ones cluster/README.md shows).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from cluster_utils import BIN, free_port, start_head, submit_job, tiny_job
from test_build_stitch import SMALL

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"prometheus": shutil.which("prometheus"), "chromium": shutil.which("chromium")}
# The tiny NFT job's actors by the repr the Actors page shows, and their classes: ActorGroup names its workers
# "<label>-<rank>" (the driver labels each value pool by use and reward); the learner ranks are Ray Train workers
# that actors.labels names by placement bundle.
LABELS = {"rollout-0": "RolloutWorker", "value-stitch-tiny-clip-0": "ValueActor",
          "value-clean-tiny-clip-0": "ValueActor", "learner-0": "RayTrainWorker"}


def scrape_config(temp: str, into: Path) -> Path:
    """Ray's generated prometheus.yml (file-based discovery of this cluster's targets), scraped every 1 s."""
    generated = Path(temp) / "session_latest" / "metrics" / "prometheus" / "prometheus.yml"
    cfg = yaml.safe_load(generated.read_text())
    cfg["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}  # a run of seconds, not hours
    # Ray lists its targets at the node's interface address even with --node-ip-address=127.0.0.1; scrape the
    # same ports on loopback so nothing here talks to another address.
    for job in cfg["scrape_configs"]:
        job["relabel_configs"] = [{"source_labels": ["__address__"], "regex": r"[^:]+:(\d+)",
                                   "target_label": "__address__", "replacement": "127.0.0.1:$1"}]
    path = into / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_prometheus(config: Path, port: int, storage: Path) -> subprocess.Popen:
    """Debian's prometheus on 127.0.0.1:port, storage in a temp dir; returns once /-/ready answers."""
    proc = subprocess.Popen([TOOLS["prometheus"], f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={storage}", "--storage.tsdb.retention.time=1d"],
                            stdout=subprocess.DEVNULL, stderr=open(storage.parent / "prometheus.log", "w"),
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(storage.parent / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5):
                return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise TimeoutError(f"prometheus on 127.0.0.1:{port} not ready within 60 s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a child started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def chromium(url: str, work: Path, *args: str, height: int = 1000) -> str:
    """Headless Chromium on a dashboard page (given time to render the app); its stdout."""
    proc = subprocess.Popen([TOOLS["chromium"], "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--no-first-run", f"--user-data-dir={work / 'chromium'}", f"--window-size=1600,{height}",
                             "--virtual-time-budget=20000", *args, url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop(proc)
    return out


def state_api(dash: str, what: str, **filters: str) -> list[dict]:
    """Rows of the dashboard's state API (what the Actors and Jobs pages read), filtered by equality."""
    query = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
    with urllib.request.urlopen(f"{dash}/api/v0/{what}?limit=10000&detail=1{query}", timeout=30) as r:
        return json.loads(r.read())["data"]["result"]["result"]


def alive_actors(dash: str) -> dict[str, str]:
    """Repr name -> class name of the cluster's alive actors that have a repr."""
    return {a["repr_name"]: a["class_name"] for a in state_api(dash, "actors", state="ALIVE") if a.get("repr_name")}


def failed_tasks(dash: str, entrypoint: str) -> tuple[int, dict[str, int]]:
    """The job's number of tasks, and its failed ones counted by function and error type."""
    with urllib.request.urlopen(f"{dash}/api/jobs/", timeout=30) as r:
        job = next(j for j in json.loads(r.read()) if entrypoint in j["entrypoint"])
    tasks = state_api(dash, "tasks", job_id=job["job_id"])
    failed: dict[str, int] = {}
    for t in tasks:
        if t["state"] == "FAILED":
            key = f"{t['func_or_class_name']} ({t.get('error_type')})"
            failed[key] = failed.get(key, 0) + 1
    return len(tasks), failed


def shoot_actors_page(dash: str, work: Path, done: threading.Event) -> dict:
    """In a thread: once every role actor is alive, the Actors page's DOM and screenshot (alive actors are listed
    first; after a job they are DEAD and paged behind others)."""
    seen: dict = {}

    def run() -> None:
        while not done.is_set():
            try:
                seen["actors"] = alive_actors(dash)
            except OSError:
                seen["actors"] = {}
            if LABELS.keys() <= seen["actors"].keys():
                seen["dom"] = chromium(f"{dash}/#/actors", work, "--dump-dom")
                chromium(f"{dash}/#/actors", work, f"--screenshot={work / 'ray_dashboard_actors.png'}",
                         height=1400)  # the whole first page of 10 actors
                return
            done.wait(3)

    seen["thread"] = threading.Thread(target=run, name="actors-page", daemon=True)
    seen["thread"].start()
    return seen


def targets(prom: int) -> list[dict]:
    """Prometheus' active scrape targets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{prom}/api/v1/targets", timeout=10) as r:
        return json.loads(r.read())["data"]["activeTargets"]


@pytest.mark.slow
@pytest.mark.skipif(not all(TOOLS.values()),
                    reason=f"needs Debian's prometheus and chromium on PATH (missing: "
                           f"{[k for k, v in TOOLS.items() if not v]}); `make setup` as root installs them")
def test_prometheus_grafana_queries_and_dashboard(random_world, random_stitches, tmp_path):
    from actors.observe import observe, report

    head = start_head(random_world)
    prom, done = None, threading.Event()
    try:
        port = free_port()
        prom = start_prometheus(scrape_config(head.temp, tmp_path), port, tmp_path / "tsdb")
        t0, dash = time.time(), f"http://127.0.0.1:{head.dashboard}"
        actors_page = shoot_actors_page(dash, tmp_path, done)
        cmd = tiny_job(head.dashboard, ROOT, tmp_path / "run", random_stitches["tiny-flux"], "train.steps=6",
                       "eval.every=0")
        job, _ = submit_job(cmd, head.metrics, timeout=1500, linger=10, env=head.env, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        done.set()
        actors_page["thread"].join(timeout=300)
        total, failed = failed_tasks(dash, "recipes/nft_flux.py")
        print(f"NFT job: {total} tasks, failed: {failed}")
        # learner replies are awaited on one pending queue get (a get that times out fails in the queue actor)
        assert not [k for k in failed if k.startswith("_QueueActor.get")], failed
        build = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{head.dashboard}", "--working-dir",
                 str(ROOT), "--", "python", "recipes/build_stitch.py", *SMALL, "finetune.steps=2",
                 f"out={tmp_path / 'stitch'}"]
        job, _ = submit_job(build, head.metrics, timeout=900, linger=10, env=head.env, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]

        scraped = targets(port)
        assert scraped and all(t["labels"]["instance"].startswith("127.0.0.1:") for t in scraped), scraped
        rows = observe(f"http://127.0.0.1:{port}", t0 - 10, time.time(), step=2)
        (tmp_path / "panels.json").write_text(json.dumps(rows, indent=1))
        print(report(rows))

        jobs_dom = chromium(f"{dash}/#/jobs", tmp_path, "--dump-dom")
        assert "recipes/nft_flux.py" in jobs_dom and "recipes/build_stitch.py" in jobs_dom
        chromium(f"{dash}/#/jobs", tmp_path, f"--screenshot={tmp_path / 'ray_dashboard_jobs.png'}")
        assert "dom" in actors_page, f"the actors {list(LABELS)} were never alive together: {actors_page.get('actors')}"
        assert LABELS.items() <= actors_page["actors"].items(), actors_page["actors"]
        assert all(name in actors_page["dom"] for name in LABELS), [n for n in LABELS if n not in actors_page["dom"]]
        for page in ("jobs", "actors"):
            shot = tmp_path / f"ray_dashboard_{page}.png"
            assert shot.stat().st_size > 10_000, f"{shot} looks blank"
            if os.environ.get("RLSTITCH_OBSERVE_DOCS"):
                shutil.copy(shot, Path(os.environ["RLSTITCH_OBSERVE_DOCS"]) / shot.name)
        assert len(rows) >= 15 and not [r for r in rows if r["problem"]], report(rows)
    finally:
        done.set()
        if prom is not None:
            stop(prom)
        head.stop()
