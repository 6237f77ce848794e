"""Probe / finetune images: the tiny world's procedural stream, or a folder of Parquet shards (images + prompts).

Probe images come in batches whose noise is seeded by `batch_seed`, here only: the single-process build
(`image_batches`) and the distributed one (`plan_shards` + `shard_batches` on stats workers) give every batch
the same t and eps, so their statistics and fits agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from rlstitch.data import parquet
from rlstitch.data import scenes as tw


def batch_seed(seed: int, offset: int) -> int:
    """Noise seed of the probe batch starting at row `offset`, so a batch gets the same t and eps wherever it
    runs: the distributed fit then equals the single-process one."""
    return seed * 1_000_003 + offset


def load_images(source: str, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, list[str]]:
    """n images in [-1, 1] and their prompts, from 'tinyworld' or a Parquet folder (first n rows)."""
    if source == "tinyworld":
        b = tw.batch(range(n), split, seed)
        return tw.to_tensor(b["images"]), list(b["captions"])
    images, captions = [], []
    for f in parquet.parquet_shards(source, split):
        b = parquet.read_parquet_shard(f)
        images.append(tw.to_tensor(b["images"]))
        captions += list(b["captions"])
        if len(captions) >= n:
            break
    x = torch.cat(images)[:n]
    if len(x) < n:
        raise ValueError(f"{source}: only {len(x)} {split} images, {n} requested")
    return x, captions[:n]


def image_batches(source: str, n: int, batch: int, seed: int) -> Iterator[tuple[int, Tensor]]:
    """(batch seed, images) over n probe images; a batch's seed fixes its noise, wherever it runs."""
    if source != "tinyworld":
        yield from _parquet_batches(source, n, batch, seed)
        return
    for k in range(0, n, batch):
        images = tw.to_tensor(tw.batch(range(k, min(k + batch, n)), "train", seed)["images"])
        yield batch_seed(seed, k), images


def _parquet_batches(source: str, n: int, batch: int, seed: int) -> Iterator[tuple[int, Tensor]]:
    """`image_batches` over the train shards of a Parquet folder, each shard read once."""
    buf, k = [], 0
    for f in parquet.parquet_shards(source, "train"):
        buf.append(tw.to_tensor(parquet.read_parquet_shard(f)["images"]))
        rows = torch.cat(buf)
        while len(rows) >= batch and k < n:
            m = min(batch, n - k)
            yield batch_seed(seed, k), rows[:m]
            rows, k = rows[m:], k + m
        buf = [rows]
        if k >= n:
            return
    rows = torch.cat(buf)[: n - k]
    if k + len(rows) < n:
        raise ValueError(f"{source}: only {k + len(rows)} train images, {n} requested")
    if len(rows):
        yield batch_seed(seed, k), rows


@dataclass(frozen=True)
class ProbeShard:
    """Probe rows [start, stop) of the Parquet folder, processed in batches whose noise comes from `seed`."""

    index: int
    start: int
    stop: int
    batch: int
    seed: int

    @property
    def images(self) -> int:
        """Probe images in the shard."""
        return self.stop - self.start


def plan_shards(n: int, batch: int, count: int, seed: int) -> list[ProbeShard]:
    """Split n probe rows into `count` contiguous shards whose boundaries fall on batch boundaries."""
    batches = -(-n // batch)
    if count > batches:
        raise ValueError(f"{n} probe images in batches of {batch} make {batches} batches, fewer than the "
                         f"{count} shards asked for: lower stats.workers or stats.shards_per_worker, or "
                         "raise probe_images or lower batch")
    cuts = [k * batches // count for k in range(count + 1)]  # near-equal batch counts per shard
    return [ProbeShard(k, cuts[k] * batch, min(cuts[k + 1] * batch, n), batch, seed) for k in range(count)]


def shard_batches(shard: ProbeShard, images: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(noise seed, images) of each probe batch of a shard, as image_batches yields them."""
    for k in range(shard.start, shard.stop, shard.batch):
        yield batch_seed(shard.seed, k), images[k - shard.start : k - shard.start + shard.batch]
