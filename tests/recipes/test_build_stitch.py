"""recipes/build_stitch.py: configs, start-up checks, and the whole build as a Ray job on a local cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cluster_utils import free_port, submit_job

ROOT = Path(__file__).resolve().parents[2]

REAL = ["sd35-medium_clip-vit-l-14", "sd35-large_dfn-clip", "flux-dev_hpsv2", "sd35-medium_aesthetic"]
FILLED = ["data=/shared/probe", "reward_path=/shared/weights", "out=/shared/out"]
# A few probe images, 2 stats workers x 2 shards, 2 ZeRO-2 learners, a handful of finetune steps.
SMALL = ["probe_images=16", "batch=4", "j_max=1", "stats.workers=2", "stats.shards_per_worker=2",
         "learner.num_workers=2", "finetune.batch=4", "finetune.train_images=8", "finetune.val_images=4",
         "finetune.eval_every=1", "finetune.ckpt_every=2", "finetune.warmup=1"]


def test_every_config_loads():
    from build_stitch import parse

    tiny = parse([])
    assert (tiny.backbone, tiny.reward, tiny.stats.workers) == ("tiny-sd3", "tiny-clip", 2)
    assert tiny.learner.zero_stage == 2
    for name in REAL:
        cfg = parse([f"config={name}", *FILLED])
        assert cfg.stats.custom_resources == {"value": 1.0}
        assert cfg.learner.custom_resources == {"learner": 1.0}
        assert cfg.learner.num_gpus == 1 and cfg.finetune.batch % cfg.learner.num_workers == 0
    assert parse(["config=flux-dev_hpsv2", *FILLED, "stats.workers=3"]).stats.workers == 3


def test_start_up_checks_name_the_knob():
    from build_stitch import parse

    from rlstitch.config import ConfigError

    cases = {
        "set data=..., reward_path=...": ["config=sd35-medium_aesthetic", "out=/x"],
        "stats.custom_resources has \\['rollout'\\]": ["stats.custom_resources={rollout: 1}"],
        "learner.custom_resources has \\['gpu_big'\\]": ["learner.custom_resources={gpu_big: 1}"],
        "not a multiple of learner.num_workers=2": ["finetune.batch=63"],
        "lower stats.shards_per_worker or stats.workers": ["probe_images=64", "stats.workers=40"],
        "learner.zero_stage must be 0, 1 or 2": ["learner.zero_stage=3"],
        "learner.bf16=true needs learner.num_gpus": ["learner.bf16=true"],
        "baselines=true is built by": ["baselines=true"],
        "the Ray build's learners take learner.bf16": ["finetune.precision=bf16"],
        "stats.num_gpus and learner.num_gpus": ["device=cuda"],
        "known configs": ["config=nope"],
    }
    for msg, argv in cases.items():
        with pytest.raises(ConfigError, match=msg):
            parse(argv)


def _stop_cluster(temp_dir: str, port: int) -> None:
    """Stop only the cluster this test started: its processes (found by its private temp dir or GCS port) and
    their children, by pid; `ray stop` would kill every Ray instance on the machine."""
    import psutil

    def ours(args: list[str]) -> bool:  # the Ray client server names only the GCS address
        return any(temp_dir in a or a.endswith(f":{port}") for a in args)

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if ours(p.info["cmdline"] or []):
                roots.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}.values()
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _submit(env: dict, dash: int, out: Path, steps: int, metrics: int) -> tuple[str, dict]:
    """`ray job submit` of the recipe (it waits for the job to end); returns its output and the metrics seen."""
    ray = str(ROOT / ".venv" / "bin" / "ray")
    cmd = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".", "--",
           "python", "recipes/build_stitch.py", *SMALL, f"finetune.steps={steps}", f"out={out}"]
    res, seen = submit_job(cmd, metrics, timeout=900, linger=0, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout + res.stderr, seen


@pytest.mark.slow
def test_ray_job_submit_builds_a_loadable_stitch_and_resumes(random_world, tmp_path):
    """ray start --head on 127.0.0.1, ray job submit the recipe, load the artifact; a second job with more
    steps resumes from the first one's last checkpoint; the cluster is stopped in any case."""
    from actors.metrics import BUILD_METRICS
    from rlstitch.eval import fidelity
    from rlstitch.models.registry import load_backbone, load_reward
    from rlstitch.stitch import artifact

    port, dash, agent, client, metrics = (free_port() for _ in range(5))  # other Ray instances hold the defaults
    temp_dir = tempfile.mkdtemp(prefix="rls-", dir="/tmp")  # short: Ray's socket paths live below it
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "RAY_metrics_report_interval_ms": "2000",  # short-lived processes export before they exit
           "RLSTITCH_TINY_DIR": str(random_world),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "torch_extensions"))}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "stitch"
    start = [str(ROOT / ".venv" / "bin" / "ray"), "start", "--head", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             f"--metrics-export-port={metrics}", "--num-cpus=2",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
        _, seen_first = _submit(env, dash, out, steps=2, metrics=metrics)
        vm = artifact.load(out, load_backbone("tiny-sd3"), load_reward("tiny-clip"))
        m = vm.manifest
        assert m["finetuned"] and [h["step"] for h in m["history"]] == [1, 2]
        assert m["distributed"]["shards"] == 4 and m["fit"]["probe_images"] == 16
        fidelity.main(["--stitch", str(out), "--json", str(tmp_path / "fid.json"), "--gallery", "24"])
        fid = json.loads((tmp_path / "fid.json").read_text())
        assert set(fid["r1_i2t"]) == {"clean", "tweedie", "stitchvm_cf", "stitchvm"} and fid["stitch"]["i"] == m["i"]
        logs, seen = _submit(env, dash, out, steps=3, metrics=metrics)
        seen = {n: max(seen.get(n, 0), seen_first.get(n, 0)) for n in BUILD_METRICS}
        assert all(v > 0 for v in seen.values()), f"build metrics absent or zero on 127.0.0.1:{metrics}: {seen}"
        assert "reusing the closed-form fit" in logs and "resumed from step 2" in logs
        m = json.loads((out / "manifest.json").read_text())
        assert [h["step"] for h in m["history"]] == [1, 2, 3]
    finally:
        _stop_cluster(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)
