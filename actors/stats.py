"""Stitch statistics workers (SPEC §4, stitch build): a data-parallel pass over Parquet probe shards.

Each StatsWorker loads the frozen backbone, reward prefix and codec once and turns a probe shard (a row range
of the Parquet files, aligned to probe batches) into that shard's StitchStats. The driver
(`collect_distributed`) hands shards to idle workers, retries a failed shard on a restarted or another worker,
keeps exactly one result per shard and merges them in shard order, so the merged statistics never count a
shard twice and do not depend on which worker ran what or in which order results arrived.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from torch import Tensor
from tqdm import tqdm

from actors.metrics import record
from rlstitch.data.parquet import read_rows
from rlstitch.data.probe import ProbeShard, shard_batches
from rlstitch.stitch.collect import collect_stats
from rlstitch.stitch.stats import StitchStats

log = logging.getLogger(__name__)


class StatsWorker:
    """Holds the frozen models of one stitch build and returns per-shard statistics."""

    def __init__(self, models: dict, data: str, j_max: int, env: dict | None = None, threads: int = 1,
                 fail_once: str = "", *, rank: int, world_size: int):
        os.environ.update(env or {})  # e.g. RLSTITCH_TINY_DIR / HF_HOME of the driver, before any model loads
        if threads:
            torch.set_num_threads(threads)  # several workers share a node's cores
        from rlstitch.stitch.build import StitchBuildConfig, load_models

        t0 = time.time()
        # A worker placed with num_gpus sees its GPU(s) only (Ray sets CUDA_VISIBLE_DEVICES).
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.backbone, self.reward, self.codec = load_models(StitchBuildConfig(**models), self.device)
        self.load_s = time.time() - t0
        self.data, self.j_max, self.fail_once = data, j_max, fail_once
        self.rank, self.world_size = rank, world_size
        self.latent_hw: tuple[int, int] | None = None

    def ready(self) -> dict:
        """Identity and model-load time (the driver waits on this before timing shards)."""
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device),
                "load_s": round(self.load_s, 2)}

    def cpu_seconds(self) -> float:
        """CPU time this worker has used (benchmarks: how much of a core a shared machine gave it)."""
        return time.process_time()

    def _maybe_fail(self) -> None:
        """Failure injection for tests: rank 0 dies on its first shard once (the marker file records it)."""
        if self.fail_once and self.rank == 0 and not os.path.exists(self.fail_once):
            Path(self.fail_once).write_text(f"killed pid {os.getpid()}\n")
            os._exit(1)  # a hard crash, as from an OOM kill: no exception reaches the driver

    @torch.no_grad()
    def stats(self, shard: ProbeShard) -> StitchStats:
        """The StitchStats of one shard."""
        self._maybe_fail()
        # The shard stays on the CPU: collect_stats moves one probe batch at a time to the device, so a large shard
        # of full-size images never has to fit in GPU memory at once.
        images = read_rows(self.data, "train", shard.start, shard.stop)[0]
        if self.latent_hw is None:
            self.latent_hw = tuple(self.codec.encode(images[:1].to(self.device)).shape[-2:])
        return collect_stats(self.backbone, self.reward, self.codec, shard_batches(shard, images), self.j_max,
                             self.latent_hw, progress=False)

    def write_closed_form(self, out: str, best, cls_mean: Tensor, extra: dict) -> str:
        """The closed-form StitchVM artifact of the selected fit (the worker holds the models it names)."""
        from rlstitch.stitch import artifact
        from rlstitch.stitch.build import stitch_layer
        from rlstitch.stitch.vm import StitchVM

        if self.latent_hw is None:
            one = read_rows(self.data, "train", 0, 1)[0].to(self.device)
            self.latent_hw = tuple(self.codec.encode(one).shape[-2:])
        layer = stitch_layer(self.backbone, self.reward, self.latent_hw, best, cls_mean)
        vm = StitchVM(self.backbone, self.reward, layer, best.i, best.j)
        return str(artifact.save(vm, out, finetuned=False, **extra))


@dataclass
class CollectReport:
    """What the distributed pass did: shards, retries, images and its wall time."""

    shards: int
    retried: int
    images: int
    tokens: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        """Probe images per second over the whole pass."""
        return self.images / max(self.seconds, 1e-9)


class _OrderedMerge:
    """Merges per-shard results in shard order, as they arrive: every merge_group consecutive items of a level
    are merged (StitchStats.merge_all) into one item of the next level, up to a single root. The result does
    not depend on arrival order (same tree for any schedule), and only about (merge_group - 1) x levels
    statistics are held at once instead of one per shard."""

    def __init__(self, count: int, group: int):
        if group < 2:
            raise ValueError(f"merge_group must be >= 2, got {group}")
        self.group = group
        self.counts = [count]  # items per level: count, ceil(count / group), ..., 1
        while self.counts[-1] > 1:
            self.counts.append(-(-self.counts[-1] // group))
        self.levels: list[dict[int, StitchStats]] = [{} for _ in self.counts]

    def add(self, index: int, stats: StitchStats, level: int = 0) -> None:
        """Keep one item; merge its group into the next level once the group is complete."""
        items = self.levels[level]
        items[index] = stats
        if level == len(self.counts) - 1:
            return  # the root
        g = index // self.group
        members = range(g * self.group, min((g + 1) * self.group, self.counts[level]))
        if all(k in items for k in members):
            self.add(g, StitchStats.merge_all([items.pop(k) for k in members]), level + 1)

    def result(self) -> StitchStats:
        """The merged statistics of every shard (after all were added)."""
        root = self.levels[-1]
        if list(root) != [0] or any(self.levels[:-1]):
            raise RuntimeError("merge incomplete: not every shard's statistics were added")
        return root[0]


def collect_distributed(group, shards: list[ProbeShard], tags: dict[str, str], max_retries: int = 2,
                        merge_group: int = 2, shard_timeout_s: float = 3600.0,
                        progress: bool = True) -> tuple[StitchStats, CollectReport]:
    """Run every shard on the group's StatsWorkers (one shard in flight per worker) and merge the results.

    A shard whose worker crashed (after Ray's own actor restart and task retry) or raised is put back in the
    queue, at most max_retries times; a dead worker gets no more shards. Each shard's result is kept once.
    """
    if not shards:
        raise ValueError("no probe shards to collect: plan at least one (stats.workers x stats.shards_per_worker)")
    empty = [s for s in shards if s.images <= 0]
    if empty:
        raise ValueError(f"probe shard {empty[0].index} (rows {empty[0].start}..{empty[0].stop}) is empty: "
                         "plan shards with plan_shards, whose shards hold at least one probe batch")
    queue, idle = deque(shards), deque(range(len(group)))
    inflight: dict = {}
    attempts = {s.index: 0 for s in shards}
    merger, kept = _OrderedMerge(len(shards), merge_group), set()
    images = tokens = retried = 0
    t0 = time.time()
    bar = tqdm(total=len(shards), desc="stitch stats", unit="shard", disable=not progress)
    while queue or inflight:
        while queue and idle:
            shard, w = queue.popleft(), idle.popleft()
            inflight[group.workers[w].stats.remote(shard)] = (shard, w)
        if not inflight:
            raise RuntimeError(f"every stats worker died with {len(queue)} shards left; see the worker logs "
                               "(`ray logs`) and lower batch or raise stats.num_cpus / memory")
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=shard_timeout_s)
        if not ready:
            raise TimeoutError(f"no stats shard finished within {shard_timeout_s:.0f} s "
                               f"(in flight: {sorted(s.index for s, _ in inflight.values())}); "
                               "raise stats.shard_timeout_s or check `ray status`")
        shard, w = inflight.pop(ready[0])
        try:
            st = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            if not isinstance(e, ray.exceptions.RayActorError):
                idle.append(w)  # the worker lives on; only this shard failed
            attempts[shard.index] += 1
            if attempts[shard.index] > max_retries:
                raise RuntimeError(f"probe shard {shard.index} (rows {shard.start}..{shard.stop}) failed "
                                   f"{attempts[shard.index]} times; last error: {e}") from e
            log.warning("probe shard %d failed on stats worker %d (%s); retrying", shard.index, w,
                        type(e).__name__)
            retried += 1
            queue.appendleft(shard)
            continue
        idle.append(w)
        if shard.index in kept:  # cannot happen with one attempt in flight per shard; never count twice
            continue
        if st.n != shard.images:
            raise RuntimeError(f"probe shard {shard.index}: statistics of {st.n} images, "
                               f"expected {shard.images}")
        kept.add(shard.index)
        merger.add(shard.index, st)
        images, tokens = images + st.n, tokens + st.tokens
        record("rlstitch_stats_shards_total", 1, tags)
        record("rlstitch_stats_tokens_total", st.tokens, tags)
        bar.update(1)
        bar.set_postfix(tokens_per_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
    bar.close()
    merged = merger.result()
    expected = sum(s.images for s in shards)
    if merged.n != expected:  # the accounting promise of the distributed pass
        raise RuntimeError(f"merged statistics hold {merged.n} images, the probe set has {expected}")
    return merged, CollectReport(len(shards), retried, images, tokens, time.time() - t0)
