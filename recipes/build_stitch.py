"""ray job submit --working-dir . -- python recipes/build_stitch.py [config=NAME] out=/DIR [key=value ...]

Run locally (starts a local Ray instance): python recipes/build_stitch.py stats.workers=4

The distributed StitchVM build, as its own Ray job: stats workers -> exact closed-form fit -> finetune under
Ray Train (SPEC §1 and §4).

NAME is a file of recipes/configs/build_stitch/ (default tiny-sd3_tiny-clip; also sd35-medium_clip-vit-l-14,
sd35-large_dfn-clip, flux-dev_hpsv2, sd35-medium_aesthetic, which need reward_path=, data= and out=).
data= is 'tinyworld' (written as Parquet shards under out/data first) or a folder of Parquet shards with
train*.parquet (probe and finetune images) and val*.parquet (held-out images), with the columns of the tiny
world's writer (`python -m rlstitch.data.parquet`).

1. Statistics: the probe set is cut into stats.workers x stats.shards_per_worker shards on probe-batch
   boundaries; each stats worker (actors/stats.py) loads the frozen models once and returns per-shard
   StitchStats; a failed shard is retried and counted once; the driver merges them (tree reduction) and
   solves every (i, j).
   The fit equals the single-process one of `python -m rlstitch.stitch.build` (same probe images and noise).
   Workers read their row ranges straight from the Parquet files (pyarrow; only the files that overlap the
   range), not through a Ray Data stream: a shard must hold exactly the probe batches of the single-process
   build, with their per-batch noise seeds, for the merged statistics to match it to 1e-8.
2. The closed-form artifact goes to out/closed_form; a re-run with the same fit settings reuses it
   (reuse_fit).
3. Finetune: Ray Train TorchTrainer, learner.num_workers data-parallel DeepSpeed ZeRO-2 workers
   (actors/stitch_finetune.py); checkpoints under out/ray_train; a re-run with the same out resumes from the
   latest one; rank 0 writes the finetuned StitchVM to out.

Under `ray job submit`, give out= as an absolute path on storage every node sees (the job's working
directory is a temporary copy).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bootstrap
import ray

from actors.group import ActorGroup, get_within
from actors.metrics import record, zero_counters
from actors.runtime import init_ray
from actors.stats import StatsWorker, collect_distributed
from actors.stitch_finetune import FinetuneJob, run_finetune
from rlstitch.config import ConfigError, load_recipe_config, to_dict
from rlstitch.data.parquet import row_counts, write_parquet_shards
from rlstitch.data.probe import plan_shards
from rlstitch.placement import STATS_RESOURCES, RoleSpec, check_resources, check_strategy
from rlstitch.stitch import artifact
from rlstitch.stitch.build import (
    StitchBuildConfig,
    manifest_fields,
    probe_seed,
    solve_and_select,
    write_fit_report,
)

CONFIGS = bootstrap.CONFIGS / "build_stitch"
DEFAULT_CONFIG = "tiny-sd3_tiny-clip"
FORWARDED_ENV = ("RLSTITCH_TINY_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
REQUIRED = "REQUIRED"  # placeholder of a value the user must give (YAML '???' would be dropped by the merge)
# Fields of the config that decide the statistics and the fit (a re-run with the same values reuses them).
FIT_KEYS = ("backbone", "backbone_path", "reward", "reward_path", "data", "probe_images", "batch", "j_max",
            "i_tolerance", "ridge", "seed")


@dataclass
class StatsConfig:
    """Stats workers: how many, how the probe set is cut, and what each reserves (the RoleSpec fields)."""

    workers: int = 2  # stats actors
    shards_per_worker: int = 2  # probe shards per worker (more shards: finer retry and load balance)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom_resources: dict[str, float] = field(default_factory=dict)  # none, or {"value": 1}
    strategy: str = "SPREAD"  # placement of the workers' bundles
    ready_timeout_s: float = 600.0  # to place the workers and load their models
    threads: int = 1  # torch threads per worker
    max_shard_retries: int = 2  # attempts of a failed shard beyond the first
    shard_timeout_s: float = 3600.0  # longest wait for any shard to finish
    merge_group: int = 2  # fan-in of the shard-ordered merge tree (2: fewest statistics held on the driver)
    fail_once: str = ""  # testing: a marker file; worker 0 crashes on its first shard unless it exists

    def role(self) -> RoleSpec:
        """The placement of the stats actor group."""
        return RoleSpec(num_workers=self.workers, num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                        custom_resources=dict(self.custom_resources), strategy=self.strategy,
                        ready_timeout_s=self.ready_timeout_s)

    def validate(self) -> None:
        """Start-up checks naming the knob to change."""
        for k in ("workers", "shards_per_worker"):
            if getattr(self, k) < 1:
                raise ConfigError(f"stats.{k} must be >= 1, got {getattr(self, k)}")
        if self.merge_group < 2:
            raise ConfigError(f"stats.merge_group must be >= 2, got {self.merge_group}")
        if self.max_shard_retries < 0 or self.shard_timeout_s <= 0:
            raise ConfigError("stats.max_shard_retries must be >= 0 and stats.shard_timeout_s > 0")
        check_strategy("stats", self.strategy)
        check_resources("stats", self.custom_resources, STATS_RESOURCES)
        self.role().validate("stats")


@dataclass
class LearnerConfig(RoleSpec):
    """Ray Train workers of the finetune (RoleSpec fields) and their DeepSpeed settings."""

    num_workers: int = 2  # data-parallel learners; finetune.batch must be a multiple
    zero_stage: int = 2  # DeepSpeed ZeRO stage (0, 1 or 2)
    bf16: bool = False  # bf16 weights and activations (GPU); fp32 otherwise
    backend: str = "auto"  # torch.distributed backend: auto = nccl on GPU, gloo on CPU
    collective_timeout_s: float = 1800.0  # every collective fails with an error after this long
    max_failures: int = 1  # Ray Train restarts from the latest checkpoint after a worker failure
    keep_checkpoints: int = 2
    threads: int = 1  # torch threads per learner

    def check(self) -> None:
        """Start-up checks naming the knob to change."""
        self.validate("learner")
        check_resources("learner", self.custom_resources)
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"learner.zero_stage must be 0, 1 or 2 (stage 3 needs DeepSpeed's forward "
                              f"hooks), got {self.zero_stage}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"learner.backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.backend == "nccl" and not self.num_gpus:
            raise ConfigError("learner.backend=nccl needs learner.num_gpus > 0 (or use backend=auto)")
        if self.bf16 and not self.num_gpus:
            raise ConfigError("learner.bf16=true needs learner.num_gpus > 0")
        check_strategy("learner", self.strategy)
        if self.keep_checkpoints < 1 or self.max_failures < 0 or self.collective_timeout_s <= 0:
            raise ConfigError("learner.keep_checkpoints must be >= 1, learner.max_failures >= 0, "
                              "learner.collective_timeout_s > 0")


@dataclass
class BuildStitchConfig(StitchBuildConfig):
    """The single-process build's knobs plus the placement of the stats workers and learners."""

    stats: StatsConfig = field(default_factory=StatsConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ray_num_cpus: int = 0  # local Ray CPUs (0: max(cores, what the workers ask)); ignored on a cluster
    reuse_fit: bool = True  # skip the statistics when out/ holds a closed-form fit of the same FIT_KEYS
    data_shard_rows: int = 512  # rows per Parquet file when the tiny world is written out
    run_name: str = ""  # the metrics' run tag (default: the name of out)

    def validate(self) -> None:
        """Start-up checks naming the knob to change."""
        unset = [k for k in ("out", "data", "backbone_path", "reward_path") if getattr(self, k) == REQUIRED]
        if unset:
            keys = ", ".join(f"{k}=..." for k in unset)
            raise ConfigError(f"set {keys} (the config leaves them {REQUIRED})")
        if self.device != "auto":  # workers take the GPUs they are placed with
            raise ConfigError(f"device={self.device!r} is the single-process build's knob; this recipe puts "
                              "workers on GPUs with stats.num_gpus and learner.num_gpus")
        super().validate()
        if self.baselines:
            raise ConfigError("baselines=true is built by `python -m rlstitch.stitch.build`, "
                              "not by this recipe")
        if self.finetune.precision != "auto":
            raise ConfigError(f"finetune.precision={self.finetune.precision} is the single-process build's knob; "
                              "the Ray build's learners take learner.bf16=true|false")
        self.stats.validate()
        self.learner.check()
        shards = self.stats.workers * self.stats.shards_per_worker
        batches = -(-self.probe_images // self.batch)
        if batches < shards:
            raise ConfigError(f"probe_images={self.probe_images} / batch={self.batch} gives {batches} "
                              f"probe batches, fewer than stats.workers x stats.shards_per_worker = {shards} "
                              "shards: lower stats.shards_per_worker or stats.workers, or raise probe_images "
                              "/ lower batch")
        n = self.learner.num_workers
        if self.finetune.batch % n:
            raise ConfigError(f"finetune.batch={self.finetune.batch} is not a multiple of "
                              f"learner.num_workers={n}: set finetune.batch to a multiple of {n} or change "
                              "learner.num_workers")
        if self.finetune.train_images < n:
            raise ConfigError(f"finetune.train_images={self.finetune.train_images} < learner.num_workers={n}")
        if self.data_shard_rows < 1:
            raise ConfigError(f"data_shard_rows must be >= 1, got {self.data_shard_rows}")


def parse(argv: list[str]) -> BuildStitchConfig:
    """config=NAME (optional) and key=value overrides -> a validated config."""
    return load_recipe_config(BuildStitchConfig, argv, CONFIGS, DEFAULT_CONFIG)


def model_fields(cfg: BuildStitchConfig) -> dict:
    """What a worker needs to load the models (plain data; the config class stays on the driver)."""
    return {"backbone": cfg.backbone, "backbone_path": cfg.backbone_path, "reward": cfg.reward,
            "reward_path": cfg.reward_path}


def worker_env(cfg: BuildStitchConfig) -> dict:
    """Environment the workers need from the driver: model locations, caches, the DeepSpeed accelerator."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.learner.num_gpus else "cpu"
    return env


def ensure_shards(folder: Path, split: str, n: int, seed: int, rows: int) -> None:
    """The first n tiny-world samples of a split as Parquet shards (kept when already complete)."""
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if files and sum(row_counts(files)) == n:
        return
    write_parquet_shards(folder, split, n, rows, seed)


def prepare_data(cfg: BuildStitchConfig, out: Path) -> tuple[str, str]:
    """(probe folder, finetune folder): the user's Parquet folder, or the tiny world written as Parquet shards
    with the images the single-process build draws (probe: seed + 1, finetune: seed)."""
    if cfg.data != "tinyworld":
        return cfg.data, cfg.data
    probe = out / "data" / f"probe-seed{probe_seed(cfg)}"
    finetune = out / "data" / f"finetune-seed{cfg.seed}"
    ensure_shards(probe, "train", cfg.probe_images, probe_seed(cfg), cfg.data_shard_rows)
    ensure_shards(finetune, "train", cfg.finetune.train_images, cfg.seed, cfg.data_shard_rows)
    ensure_shards(finetune, "val", cfg.finetune.val_images, cfg.seed, cfg.data_shard_rows)
    return str(probe), str(finetune)


def reusable_fit(cfg: BuildStitchConfig, out: Path) -> dict | None:
    """The closed-form artifact's manifest if it was fitted with this config's FIT_KEYS, else None."""
    if not cfg.reuse_fit or not (out / "closed_form" / "manifest.json").is_file():
        return None
    m = artifact.read_manifest(out / "closed_form")
    same = all(m.get("config", {}).get(k) == getattr(cfg, k) for k in FIT_KEYS)
    return m if same and (out / "stats.safetensors").is_file() else None


def fit_stage(cfg: BuildStitchConfig, out: Path, probe_dir: str, env: dict, tags: dict) -> dict:
    """Distributed statistics -> every fit -> (i*, j*) -> closed-form artifact; returns manifest fields."""
    shards = plan_shards(cfg.probe_images, cfg.batch, cfg.stats.workers * cfg.stats.shards_per_worker,
                         probe_seed(cfg))
    zero_counters(("rlstitch_stats_shards_total", "rlstitch_stats_tokens_total"), tags)  # seen at 0 while workers load
    group = ActorGroup(StatsWorker, cfg.stats.role(), model_fields(cfg), probe_dir, cfg.j_max, env,
                       cfg.stats.threads, cfg.stats.fail_once, role="stats")
    try:
        group.call("ready", timeout=cfg.stats.ready_timeout_s)  # models loaded on every worker
        stats, rep = collect_distributed(group, shards, tags, cfg.stats.max_shard_retries,
                                         cfg.stats.merge_group, cfg.stats.shard_timeout_s)
        print(f"[stats] {rep.shards} shards ({rep.retried} retried), {rep.images} probe images, {rep.tokens} "
              f"tokens in {rep.seconds:.1f} s ({rep.images_per_s:.1f} images/s)")
        fits, best = solve_and_select(stats, cfg, "stitchvm")
        record("rlstitch_fit_residual", best.rel_residual, tags)
        write_fit_report(out, stats, fits, best)
        extra = manifest_fields(cfg, fits, best, rep.seconds)
        extra["distributed"] = {"stats_workers": cfg.stats.workers, "shards": rep.shards,
                                "retried": rep.retried, "learners": cfg.learner.num_workers,
                                "zero_stage": cfg.learner.zero_stage}
        write_closed_form(group, str(out / "closed_form"), best, stats.sum_cls[best.j] / stats.n, extra,
                          cfg.stats.shard_timeout_s)
    finally:
        group.shutdown()
    return extra


def write_closed_form(group: ActorGroup, path: str, best, cls_mean, extra: dict, timeout_s: float) -> None:
    """The closed-form artifact, written by the first stats worker still alive (it holds the models)."""
    for w in group.workers:
        try:
            get_within(w.write_closed_form.remote(path, best, cls_mean, extra), timeout_s,
                       f"the stats worker did not write {path}", "raise stats.shard_timeout_s")
            return
        except ray.exceptions.RayActorError:
            continue
    raise RuntimeError("no stats worker is alive to write the closed-form artifact; see `ray logs`")


def run(cfg: BuildStitchConfig) -> Path:
    """The whole build; returns the artifact folder."""
    out = Path(cfg.out).resolve()
    if os.environ.get("RAY_ADDRESS") and not Path(cfg.out).is_absolute():
        print(f"warning: out={cfg.out} is relative: under `ray job submit` it lands in the job's temporary "
              "working directory; pass an absolute path on shared storage")
    out.mkdir(parents=True, exist_ok=True)
    stages = (cfg.stats.role().cpus, cfg.learner.cpus)
    init_ray(cfg.ray_num_cpus or None, need=max(stages) + 1)  # the stages run one after the other
    tags = {"role": "stats", "recipe": "build_stitch", "run": cfg.run_name or out.name}
    env = worker_env(cfg)
    probe_dir, finetune_dir = prepare_data(cfg, out)
    manifest = reusable_fit(cfg, out)
    if manifest is not None:
        print(f"[stats] reusing the closed-form fit in {out / 'closed_form'} (i*={manifest['i']}, "
              f"j*={manifest['j']}; reuse_fit=false recomputes it)")
        extra = {k: manifest[k] for k in ("fit", "data", "distributed") if k in manifest}
        extra["config"] = to_dict(cfg)  # this run's finetune / placement settings
    else:
        extra = fit_stage(cfg, out, probe_dir, env, tags)
        if (out / "ray_train").exists():  # checkpoints of another fit must not be resumed onto this one
            print(f"[finetune] new closed-form fit: removing the old checkpoints in {out / 'ray_train'}")
            shutil.rmtree(out / "ray_train")
    job = FinetuneJob(out=str(out), closed_form=str(out / "closed_form"), models=model_fields(cfg),
                      data=finetune_dir, finetune=asdict(cfg.finetune), zero_stage=cfg.learner.zero_stage,
                      bf16=cfg.learner.bf16, threads=cfg.learner.threads, env=env,
                      tags={**tags, "role": "learner"}, manifest=extra)
    run_finetune(job, cfg.learner, out / "ray_train")
    return out


def main(argv: list[str] | None = None) -> Path:
    """CLI: config=NAME and key=value overrides."""
    cfg = parse(list(sys.argv[1:] if argv is None else argv))
    out = run(cfg)
    m = artifact.read_manifest(out)
    print(json.dumps({"artifact": str(out), "i": m["i"], "j": m["j"], "finetuned": m.get("finetuned")}))
    return out


if __name__ == "__main__":
    main()
