"""Simulated multi-node Ray clusters on one machine, for tests and trying the doctor (issue #29).

    SimCluster(nodes={"rollout": {"CPU": 1, "rollout": 1}, ...})   several raylets (ray.cluster_utils.Cluster)
    AutoscalingHead(node_types)                                    a head whose autoscaler launches fake nodes

Both start with every port explicit and a temp dir of their own (other Ray clusters may run on the machine:
Ray's default ports and /tmp/ray are theirs), and stop every process they started, never by `ray stop`. The
dashboard (AutoscalingHead only) binds to 127.0.0.1. SimCluster's nodes take the machine's address: a driver
connecting to 127.0.0.1:<port> is sent to the interface address by Ray 2.60 (resolve_ip_for_localhost), which
an in-process GCS bound to 127.0.0.1 does not answer; the GCS then listens on every address, as `ray start` does.
Ray's own AutoscalingCluster cannot be used: its start() and shutdown() run `ray stop --force`, which kills
every Ray instance on the machine, and its config needs fake_multi_node/example.yaml, which the Ray 2.60 wheel
does not ship (FileNotFoundError). The fake provider is loaded as an "external" one for the same reason (the
"fake_multinode" type reads its defaults from that file).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray._private.state

BIN = Path(sys.executable).parent
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
# Dead raylets are noticed within ~3 s instead of Ray's default ~30 s (health checks every 1 s, 3 misses).
FAST_HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
               "health_check_failure_threshold": 3}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll the job API on 127.0.0.1:port until it answers (or the head process `proc` died)."""
    import urllib.request

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


def short_temp_dir(prefix: str) -> str:
    """A fresh temp dir with a short path (Ray's socket paths live under it and must stay < 108 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def role_of(resources: dict[str, float], roles: tuple[str, ...] = ("rollout", "value", "learner")) -> str:
    """The role a node offers (its first role resource), or "plain" (the head, a node without roles)."""
    return next((r for r in roles if resources.get(r)), "plain")


class _AddressFile:
    """Keeps /tmp/ray/ray_current_cluster as it was: Cluster writes its address there, which other Ray users
    on the machine (`ray status`, address="auto") would then pick up."""

    PATH = Path("/tmp/ray/ray_current_cluster")

    def __init__(self):
        self.before = self.PATH.read_bytes() if self.PATH.exists() else None

    def restore(self) -> None:
        """Put back the file's previous content (or remove it if there was none)."""
        if self.before is None:
            self.PATH.unlink(missing_ok=True)
        else:
            tmp = self.PATH.with_suffix(".rlstitch-tmp")
            tmp.write_bytes(self.before)
            os.replace(tmp, self.PATH)


class SimCluster:
    """A head plus one worker node per entry of `nodes` ({name: resources}), all raylets of this process.

    Use as a context manager: start, connect the driver, and on exit disconnect and stop every node."""

    def __init__(self, nodes: dict[str, dict[str, float]], head_cpus: float = 1, connect: bool = True):
        self.spec, self.head_cpus, self.connect = dict(nodes), head_cpus, connect
        self.cluster = None
        self.nodes: dict[str, object] = {}  # name -> ray._private.node.Node
        self.killed: list[str] = []  # names of the nodes kill_node took down, in order
        self.temp = short_temp_dir("sim")

    def __enter__(self) -> SimCluster:
        from ray.cluster_utils import Cluster

        self._address_file = _AddressFile()
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": self.head_cpus, "gcs_server_port": free_port(), "dashboard_port": free_port(),
                "include_dashboard": False, "dashboard_agent_listen_port": free_port(),
                "metrics_export_port": free_port(), "temp_dir": self.temp, "_system_config": FAST_HEALTH})
            for name, resources in self.spec.items():
                self.add_node(name, resources)
            if self.connect:
                ray.init(address=self.cluster.address, log_to_driver=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def add_node(self, name: str, resources: dict[str, float]) -> None:
        """Start one worker node offering `resources` (CPU / GPU / custom)."""
        res = dict(resources)
        self.nodes[name] = self.cluster.add_node(
            num_cpus=res.pop("CPU", 0), num_gpus=res.pop("GPU", 0), resources=res,
            metrics_export_port=free_port())

    def kill_node(self, name: str) -> None:
        """SIGKILL a worker node's processes, as a preempted machine would vanish (the GCS marks it dead)."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)
        self.killed.append(name)

    def wait_dead(self, count: int, timeout: float = 60) -> list[dict]:
        """Wait until the GCS lists `count` dead nodes (ray.nodes() Alive=False); returns them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n in self.cluster.global_state.node_table() if not n["Alive"]]
            if len(dead) >= count:
                return dead
            time.sleep(0.5)
        raise TimeoutError(f"the GCS did not mark {count} node(s) dead within {timeout} s")

    def __exit__(self, *exc) -> None:
        """Disconnect (if this connected), stop every node (workers first), restore the address file, remove the
        temp dir. A driver connected elsewhere (a test session's local Ray) is left alone."""
        if self.connect and ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            keep_driver_kv()
        self._address_file.restore()
        shutil.rmtree(self.temp, ignore_errors=True)


def keep_driver_kv() -> None:
    """Re-attach this process's internal KV to the cluster its driver is still connected to: Cluster.shutdown()
    resets it globally, which left every later ray.experimental.internal_kv call of a test session's driver
    failing ('NoneType' object has no attribute 'internal_kv_get')."""
    from ray._private.worker import global_worker
    from ray.experimental.internal_kv import _initialize_internal_kv

    if ray.is_initialized():
        _initialize_internal_kv(global_worker.gcs_client)


def fake_autoscaling_config(node_types: dict[str, dict], head_resources: dict[str, float], gcs: str,
                            idle_timeout_minutes: float = 0.1) -> dict:
    """A cluster config for the fake multi-node provider: the head plus `node_types` (resources, min/max)."""
    types = {name: {"node_config": {}, **spec} for name, spec in node_types.items()}
    types["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "rlstitch-fake", "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types, "head_node_type": "ray.head.default", "auth": {"ssh_user": "ubuntu"},
        "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingHead:
    """`ray start --head --block --autoscaling-config` with the fake provider (RAY_FAKE_CLUSTER=1): its
    autoscaler starts a raylet per node it "launches" and stops it when the node has been idle too long.

    Use as a context manager; on exit every process under the head (autoscaler, fake nodes, workers) is stopped."""

    def __init__(self, node_types: dict[str, dict], head_cpus: float = 1, idle_timeout_minutes: float = 0.1,
                 env: dict | None = None):
        self.gcs_port, self.dashboard = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.temp = short_temp_dir("fas")
        self.config = fake_autoscaling_config(node_types, {"CPU": head_cpus}, self.gcs, idle_timeout_minutes)
        self.config_path = Path(self.temp) / "autoscaling.json"
        self.extra_env, self.head_cpus, self.proc = dict(env or {}), head_cpus, None

    @property
    def env(self) -> dict:
        """The environment of the head, its autoscaler and nodes (also right for `ray job submit`)."""
        env = os.environ | {"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
                            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                            "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                            # the cluster file, as ~/ray_bootstrap_config.yaml on a `ray up` head (actors.group)
                            "RLSTITCH_CLUSTER_FILE": str(self.config_path),
                            # the dashboard's and autoscaler's exporters off Ray's fixed defaults (other clusters)
                            "DASHBOARD_METRIC_PORT": str(free_port()), "AUTOSCALER_METRIC_PORT": str(free_port()),
                            **self.extra_env}
        # This cluster, for processes that connect on their own (Ray Train's placement group cleaner): with
        # several Ray clusters on the machine, address auto-detection fails ("Found multiple active Ray instances").
        env["RAY_ADDRESS"] = self.gcs
        return env

    def __enter__(self) -> AutoscalingHead:
        cfg = self.config_path
        cfg.write_text(json.dumps(self.config))
        self._address_file = _AddressFile()
        self._env = self.env
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--autoscaling-config={cfg}", f"--num-cpus={self.head_cpus}", f"--port={self.gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", "--include-dashboard=true",
             f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp}", "--disable-usage-stats",
             f"--system-config={json.dumps(FAST_HEALTH, separators=(',', ':'))}"],
            env=self._env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for_dashboard(self.dashboard, self.proc)
            self._wait_for_head_node()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def alive_nodes(self) -> dict[str, str]:
        """{node id: role} of the alive nodes (the head is "plain"), read from the GCS (no driver needed)."""
        return {n["NodeID"]: role_of(n["Resources"]) for n in self._state.node_table() if n["Alive"]}

    def last_actor_end(self) -> dict[str, float]:
        """{node id: unix time its last actor ended} from the GCS actor table: when a node's work stopped."""
        ends: dict[str, float] = {}
        for a in self._state.actor_table(None).values():
            node = a["Address"]["NodeID"]
            if a["EndTime"]:
                ends[node] = max(ends.get(node, 0.0), a["EndTime"] / 1000)
        return ends

    def alive_roles(self) -> list[str]:
        """The role of every alive node, sorted."""
        return sorted(self.alive_nodes().values())

    def _wait_for_head_node(self, timeout: float = 120) -> None:
        """Wait until the head's raylet has registered (a few seconds after the dashboard answers)."""
        from ray._raylet import GcsClientOptions

        self._state = ray._private.state.GlobalState()
        self._state._initialize_global_state(GcsClientOptions.create(
            self.gcs, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
        deadline = time.monotonic() + timeout
        while not self.alive_roles():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the head node did not register with the GCS within {timeout} s")
            time.sleep(1)

    @property
    def dashboard_url(self) -> str:
        """The job API / dashboard address (127.0.0.1 only)."""
        return f"http://127.0.0.1:{self.dashboard}"

    def __exit__(self, *exc) -> None:
        """Stop the head and every process it started (the fake nodes are the autoscaler's children)."""
        import psutil

        if self.proc is None:
            return
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        self.proc.terminate()  # `ray start --block` stops the head's own processes
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for p in family:  # what outlived the head: fake nodes' raylets and their workers
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        gone, left = psutil.wait_procs(family, timeout=15)
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=10)
        self._address_file.restore()
        shutil.rmtree(self.temp, ignore_errors=True)
