"""Probe / finetune images: the tiny world's procedural stream, or a folder of Parquet shards (images + prompts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from rlstitch.tinyworld import data as tw


def parquet_shards(folder: str | Path, split: str | None = None) -> list[Path]:
    """The .parquet files of a folder (optionally only those of one split), sorted."""
    files = sorted(Path(folder).glob(f"{split or ''}*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split or ''}*.parquet shards in {folder}")
    return files


def load_images(source: str, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, list[str]]:
    """n images in [-1, 1] and their prompts, from 'tinyworld' or a Parquet folder (first n rows)."""
    if source == "tinyworld":
        b = tw.batch(range(n), split, seed)
        return tw.to_tensor(b["images"]), list(b["captions"])
    images, captions = [], []
    for f in parquet_shards(source, split):
        b = tw.read_parquet_shard(f)
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
        yield seed * 1_000_003 + k, images


def _parquet_batches(source: str, n: int, batch: int, seed: int) -> Iterator[tuple[int, Tensor]]:
    """`image_batches` over the train shards of a Parquet folder, each shard read once."""
    buf, k = [], 0
    for f in parquet_shards(source, "train"):
        buf.append(tw.to_tensor(tw.read_parquet_shard(f)["images"]))
        rows = torch.cat(buf)
        while len(rows) >= batch and k < n:
            m = min(batch, n - k)
            yield seed * 1_000_003 + k, rows[:m]
            rows, k = rows[m:], k + m
        buf = [rows]
        if k >= n:
            return
    rows = torch.cat(buf)[: n - k]
    if k + len(rows) < n:
        raise ValueError(f"{source}: only {k + len(rows)} train images, {n} requested")
    if len(rows):
        yield seed * 1_000_003 + k, rows
