"""Stitch statistics throughput with 1 and 2 stats workers in one run, and their memory on paper.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stitch_stats_scaling.py [--probe-images 512] [--batch 16]

Part 1 runs the distributed statistics pass of recipes/build_stitch.py (actors/stats.py) on the tiny world
with 1 and then 2 workers (one torch thread each) on a local Ray instance, after every worker has loaded its
models and run one warm-up batch, and prints probe images/s and the speed-up. The tiny world's trained weights
are used when present, else a world of random weights (same shapes, so same cost) is written to a temp folder.

Part 2 prints, for the real configurations, the float64 statistics StitchStats keeps for every (i, j <= j_max)
pair, computed on paper from its layout: X^T X per DiT block, X^T Y per pair, the per-position sums, and the
peaks of a worker (accumulator + its serialised result + one probe batch's float64 features) and of the driver
(the shard-ordered merge tree keeps about (merge_group - 1) x log_merge_group(shards) + 4 statistics,
counting merge_all's temporaries).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bootstrap

GB = 1024**3


@dataclass(frozen=True)
class Layout:
    """The shapes that size a StitchStats: DiT blocks x width, reward blocks j <= j_max x width, positions."""

    name: str
    blocks_u: int
    d_u: int
    blocks_r: int  # j = 0..j_max
    d_r: int
    positions: int  # reward patch grid (16 x 16 for a /14 ViT at 224 px)


# Widths and depths from the models' configs (diffusers transformer configs, open_clip ViT configs).
REAL = [
    Layout("SD3.5-M (24 x 1536) x CLIP ViT-L/14 (1024)", 24, 1536, 5, 1024, 256),
    Layout("SD3.5-L (38 x 2432) x DFN CLIP ViT-H/14 (1280)", 38, 2432, 5, 1280, 256),
    Layout("FLUX.1-dev (19+38 x 3072) x HPSv2 ViT-H/14 (1280)", 57, 3072, 5, 1280, 256),
    Layout("SD3.5-M (24 x 1536) x aesthetic CLIP ViT-L/14 (1024)", 24, 1536, 5, 1024, 256),
]


def stats_bytes(s: Layout) -> dict[str, int]:
    """Bytes of each float64 accumulator of a StitchStats (rlstitch/stitch/stats.py)."""
    return {
        "xtx": 8 * s.blocks_u * s.d_u * s.d_u,
        "xty": 8 * s.blocks_u * s.blocks_r * s.d_u * s.d_r,
        "sums": 8 * (s.blocks_u * s.positions * s.d_u + s.blocks_r * (s.positions * s.d_r + s.d_r + 1)),
    }


def batch_feature_bytes(s: Layout, batch: int) -> int:
    """float32 features of one probe batch plus their float64 copies inside StitchStats.update."""
    return (4 + 8) * batch * s.positions * (s.blocks_u * s.d_u + s.blocks_r * s.d_r)


def memory_table(batch: int, shards: int, merge_group: int) -> str:
    """The on-paper memory of the statistics for the real configurations."""
    head = (f"{'configuration':<52s} {'pairs':>6s} {'XtX':>8s} {'XtY':>8s} {'sums':>7s} {'stats':>8s} "
            f"{'worker pk':>10s} {'driver pk':>10s}")
    lines = [head, "-" * len(head)]
    levels = math.ceil(math.log(shards, merge_group) - 1e-9) if shards > 1 else 0
    # Pending items per level of the merge tree, plus merge_all's temporaries while a group is merged
    # (the pair sum, an empty StitchStats and the returned copy).
    held = (merge_group - 1) * levels + 4
    for s in REAL:
        b = stats_bytes(s)
        total = sum(b.values())
        worker = 2 * total + batch_feature_bytes(s, batch)
        lines.append(f"{s.name:<52s} {s.blocks_u * s.blocks_r:>6d} {b['xtx'] / GB:>7.2f}G "
                     f"{b['xty'] / GB:>7.2f}G {b['sums'] / GB:>6.2f}G {total / GB:>7.2f}G "
                     f"{worker / GB:>9.2f}G {held * total / GB:>9.2f}G")
    lines.append(f"(float64; j = 0..4; worker peak = 2 x stats + the features of one batch of {batch}; "
                 f"driver peak = {held} stats for {shards} shards, merge_group {merge_group})")
    return "\n".join(lines)


def random_world(root: Path) -> None:
    """Random-weight tiny models of the trained tiny world's shapes (for machines without its weights)."""
    from rlstitch.data import scenes as data
    from rlstitch.models.registry import save_tiny_clip
    from rlstitch.models.tokenizer import WordTokenizer
    from rlstitch.tinyworld import models as tm

    captions = (data.sample(i).caption for i in range(300))
    words = sorted({w for c in captions for w in WordTokenizer([]).split(c)})
    save_tiny_clip(tm.build("clip", words, seed=0), tm.clip_config(words), root / "clip")
    tm.build("vae", seed=0).save_pretrained(root / "vae")
    tm.build("sd3", seed=0).save_pretrained(root / "sd3")


def tiny_world_ready() -> bool:
    """Whether the registry finds the trained tiny-sd3, tiny-clip and tiny-vae."""
    from rlstitch.models.registry import tiny_root

    return all((tiny_root() / d / "config.json").is_file() for d in ("sd3", "clip", "vae"))


def throughput(workers: int, folder: str, args, env: dict) -> dict:
    """Statistics passes with `workers` stats actors, timed after model load and warm-up; the best of
    args.repeats passes counts (a shared machine's other load only ever slows a pass down)."""
    from actors.group import ActorGroup
    from actors.stats import StatsWorker, collect_distributed
    from rlstitch.data.probe import ProbeShard, plan_shards
    from rlstitch.placement import RoleSpec

    shards = plan_shards(args.probe_images, args.batch, workers * args.shards_per_worker, seed=1)
    group = ActorGroup(StatsWorker, RoleSpec(num_workers=workers, num_cpus=1), {"backbone": "tiny-sd3",
                       "reward": "tiny-clip"}, folder, args.j_max, env, 1, role="stats")
    try:
        group.call("ready", timeout=600)
        group.call("stats", ProbeShard(-1, 0, args.batch, args.batch, 1), timeout=600)  # warm-up batch
        tags = {"role": "stats", "recipe": "benchmark", "run": f"workers{workers}"}
        passes = []
        for _ in range(args.repeats):
            c0, t0 = sum(group.call("cpu_seconds")), time.perf_counter()
            stats, _ = collect_distributed(group, shards, tags, progress=False)
            passes.append((time.perf_counter() - t0, sum(group.call("cpu_seconds")) - c0))
        seconds, cpu = min(passes)
    finally:
        group.shutdown()
    assert stats.n == args.probe_images
    return {"workers": workers, "shards": len(shards), "images": stats.n, "tokens": stats.tokens,
            "seconds": seconds, "images_per_s": stats.n / seconds, "cores_used": cpu / seconds,
            "images_per_cpu_s": stats.n / cpu}


def throughput_table(rows: list[dict]) -> str:
    """Images/s and speed-up over the first row."""
    head = (f"{'workers':>7s} {'shards':>6s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} "
            f"{'speed-up':>8s} {'cores used':>10s} {'images/cpu-s':>12s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        speedup = r["images_per_s"] / rows[0]["images_per_s"]
        lines.append(f"{r['workers']:>7d} {r['shards']:>6d} {r['images']:>7d} {r['seconds']:>8.2f} "
                     f"{r['images_per_s']:>9.1f} {speedup:>7.2f}x {r['cores_used']:>10.2f} "
                     f"{r['images_per_cpu_s']:>12.1f}")
    lines.append("(cores used = the workers' CPU seconds / wall seconds: below the worker count when other "
                 "processes share the cores)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Both parts; returns the figures (also written with --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe-images", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--j-max", type=int, default=4)
    p.add_argument("--shards-per-worker", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="passes per worker count (the best is reported)")
    p.add_argument("--paper-batch", type=int, default=8, help="probe batch of the real configs (memory)")
    p.add_argument("--paper-shards", type=int, default=32, help="shards of the real configs (memory table)")
    p.add_argument("--paper-merge-group", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rlstitch.data import parquet as tw

    with tempfile.TemporaryDirectory(prefix="stitch-bench-") as tmp:
        env = {}
        world = "trained tiny world"
        if not tiny_world_ready():
            random_world(Path(tmp) / "world")
            env["RLSTITCH_TINY_DIR"] = str(Path(tmp) / "world")
            world = "random-weight tiny world (trained weights not found)"
        folder = Path(tmp) / "probe"
        tw.write_parquet_shards(folder, "train", args.probe_images, 128, seed=1)
        one_thread = {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}}
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, runtime_env=one_thread)
        try:
            rows = [throughput(int(w), str(folder), args, env) for w in args.workers.split(",")]
        finally:
            ray.shutdown()
    print(f"stitch statistics throughput: tiny-sd3 x tiny-clip ({world}), {args.probe_images} probe images, "
          f"batch {args.batch}, j <= {args.j_max}, {args.ray_cpus} Ray CPUs, 1 torch thread per worker, "
          f"best of {args.repeats} passes")
    print(throughput_table(rows))
    print()
    print("statistics memory of the real configurations, on paper")
    print(memory_table(args.paper_batch, args.paper_shards, args.paper_merge_group))
    res = {"throughput": rows, "world": world}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
