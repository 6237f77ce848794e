"""Float64 sufficient statistics for the closed-form stitch fit of every (i, j) pair (SPEC §1, Stage 1).

They add across batches, shards and workers, so merged statistics give the single-process fit exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from rlstitch.io import atomic_write

FORMAT = "rlstitch.stitch_stats"
VERSION = 1
_F64 = torch.float64


def _check_blocks(feats: Mapping[int, Tensor], blocks: list[int], tail: tuple[int, ...], what: str,
                  batch: int | None = None) -> int:
    """Validates {block: [B, *tail]} (keys == blocks, one finite B-batch; B = `batch` when given); returns B."""
    if sorted(feats) != sorted(blocks):
        raise ValueError(f"{what} has blocks {sorted(feats)}, expected {sorted(blocks)}")
    for b in blocks:
        t = feats[b]
        if tuple(t.shape[1:]) != tail or batch not in (None, t.shape[0]):
            want = ", ".join(["B" if batch is None else str(batch), *map(str, tail)])
            raise ValueError(f"{what} block {b}: shape {tuple(t.shape)}, expected [{want}]")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what} block {b}: non-finite values in a tensor of shape {tuple(t.shape)}")
        batch = t.shape[0]
    return int(batch)


class StitchStats:
    """Per-(i, j) sums n, sum x (per position), X^T X, sum y (per position), sum |y|^2, X^T Y.

    Also sum_cls[j]: the sum of the reward's [CLS] token entering block j, whose mean initialises the
    stitched sequence's [CLS] (it is additive like the rest).
    """

    def __init__(self, blocks_u: Sequence[int], blocks_r: Sequence[int], d_u: int, d_r: int, positions: int):
        self.blocks_u, self.blocks_r = [int(b) for b in blocks_u], [int(b) for b in blocks_r]
        self.d_u, self.d_r, self.positions = int(d_u), int(d_r), int(positions)
        if len(set(self.blocks_u)) != len(self.blocks_u) or len(set(self.blocks_r)) != len(self.blocks_r):
            raise ValueError(f"duplicate blocks: blocks_u={self.blocks_u}, blocks_r={self.blocks_r}")
        P = self.positions
        self.n = 0
        self.sum_x = {i: torch.zeros(P, self.d_u, dtype=_F64) for i in self.blocks_u}
        self.xtx = {i: torch.zeros(self.d_u, self.d_u, dtype=_F64) for i in self.blocks_u}
        self.sum_y = {j: torch.zeros(P, self.d_r, dtype=_F64) for j in self.blocks_r}
        self.yy = {j: torch.zeros((), dtype=_F64) for j in self.blocks_r}
        self.sum_cls = {j: torch.zeros(self.d_r, dtype=_F64) for j in self.blocks_r}
        self.xty = {(i, j): torch.zeros(self.d_u, self.d_r, dtype=_F64)
                    for i in self.blocks_u for j in self.blocks_r}

    @property
    def tokens(self) -> int:
        """Number of token rows seen (images x positions)."""
        return self.n * self.positions

    def _layout(self) -> tuple:
        """Everything two mergeable statistics must share."""
        return (self.blocks_u, self.blocks_r, self.d_u, self.d_r, self.positions)

    def update(self, feats_u: Mapping[int, Tensor], feats_r: Mapping[int, Tensor],
               cls_r: Mapping[int, Tensor] | None = None) -> None:
        """Adds one batch: feats_u[i] [B, P, d_u] after DiT block i, feats_r[j] [B, P, d_r] into block j,
        and optionally cls_r[j] [B, d_r], the [CLS] token entering block j."""
        bu = _check_blocks(feats_u, self.blocks_u, (self.positions, self.d_u), "DiT")
        br = _check_blocks(feats_r, self.blocks_r, (self.positions, self.d_r), "reward")
        if bu != br:
            raise ValueError(f"DiT batch {bu} differs from reward batch {br}")
        if cls_r is not None:  # checked before any sum changes: a bad batch leaves no partial update
            _check_blocks(cls_r, self.blocks_r, (self.d_r,), "reward [CLS]", bu)
        # Products in float64 on the features' device (no precision loss), accumulated on the CPU.
        xs = {i: feats_u[i].to(_F64) for i in self.blocks_u}
        ys = {j: feats_r[j].to(_F64) for j in self.blocks_r}
        for i, x in xs.items():
            self.sum_x[i] += x.sum(0).cpu()
            flat = x.reshape(-1, self.d_u)
            self.xtx[i] += (flat.T @ flat).cpu()
        for j, y in ys.items():
            self.sum_y[j] += y.sum(0).cpu()
            self.yy[j] += y.square().sum().cpu()
            if cls_r is not None:
                self.sum_cls[j] += cls_r[j].to(_F64).sum(0).cpu()
        for (i, j), acc in self.xty.items():
            acc += (xs[i].reshape(-1, self.d_u).T @ ys[j].reshape(-1, self.d_r)).cpu()
        self.n += bu

    def merge(self, other: StitchStats) -> StitchStats:
        """Sum of two statistics as a new object (associative and commutative up to float64 rounding)."""
        if self._layout() != other._layout():
            raise ValueError(f"cannot merge stats with layout {self._layout()} and {other._layout()} "
                             "(blocks_u, blocks_r, d_u, d_r, positions)")
        out = StitchStats(*self._layout())
        out.n = self.n + other.n
        for name in ("sum_x", "xtx", "sum_y", "yy", "sum_cls", "xty"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(out, name, {k: mine[k] + theirs[k] for k in mine})
        return out

    @staticmethod
    def merge_all(stats: Sequence[StitchStats]) -> StitchStats:
        """Pairwise tree reduction (balanced rounding error, log depth)."""
        if not stats:
            raise ValueError("merge_all needs at least one StitchStats")
        level = list(stats)
        while len(level) > 1:
            pairs = [level[k].merge(level[k + 1]) for k in range(0, len(level) - 1, 2)]
            level = pairs + ([level[-1]] if len(level) % 2 else [])
        return level[0].merge(StitchStats(*level[0]._layout()))  # always a new object

    def _slots(self) -> list[tuple[str, dict, object]]:
        """(file name, accumulator dict, key) of every tensor, e.g. ("xty.3.0", self.xty, (3, 0))."""
        out = [(f"{name}.{i}", store, i) for name, store in (("sum_x", self.sum_x), ("xtx", self.xtx))
               for i in self.blocks_u]
        out += [(f"{name}.{j}", store, j)
                for name, store in (("sum_y", self.sum_y), ("yy", self.yy), ("sum_cls", self.sum_cls))
                for j in self.blocks_r]
        return out + [(f"xty.{i}.{j}", self.xty, (i, j)) for (i, j) in self.xty]

    def save(self, path: str | os.PathLike) -> None:
        """Writes a safetensors file atomically (temp file in the same folder, then os.replace)."""
        meta = {"format": FORMAT, "version": VERSION, "blocks_u": self.blocks_u, "blocks_r": self.blocks_r,
                "d_u": self.d_u, "d_r": self.d_r, "positions": self.positions, "n": self.n}
        tensors = {name: d[k].contiguous() for name, d, k in self._slots()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"stitch_stats": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> StitchStats:
        """Reads a file written by save; ValueError naming the path if it is corrupt or incomplete."""
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["stitch_stats"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types on truncation
            raise ValueError(f"{path}: not a readable StitchStats file ({type(e).__name__}: {e})") from e
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: format {meta.get('format')} v{meta.get('version')}, "
                             f"expected {FORMAT} v{VERSION}")
        try:
            out = cls(meta["blocks_u"], meta["blocks_r"], meta["d_u"], meta["d_r"], meta["positions"])
            out.n = int(meta["n"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: bad StitchStats metadata {meta}") from e
        for name, store, key in out._slots():
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"{path}: missing tensor {name!r}")
            if t.shape != store[key].shape or t.dtype != _F64:
                raise ValueError(f"{path}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, "
                                 f"expected {tuple(store[key].shape)} float64")
            store[key] = t
        return out
