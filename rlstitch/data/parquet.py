"""Parquet shards of images + captions: the one writer and the readers every job uses.

    python -m rlstitch.data.parquet --out DIR --split val --n 2048

A shard holds the columns index, image (PNG bytes), caption, aesthetic and split; a folder's shards are read in
sorted file order, so row k of a split is the same image whichever reader (single-process build, stats worker,
finetune learner) asks for it.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from rlstitch.data.scenes import IMAGE_SIZE, SPLIT_IDS, SPLIT_SIZES, batch, check_split_index, to_tensor

_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("aesthetic", pa.float32()),
        ("split", pa.string()),
    ]
)


def encode_png(image: np.ndarray) -> bytes:
    """Losslessly encode a uint8 [H, W, 3] image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 [H, W, 3] array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _shard_table(indices: Sequence[int], split: str, seed: int) -> pa.Table:
    """Build the pyarrow table for one shard."""
    b = batch(indices, split, seed)
    return pa.table(
        {
            "index": pa.array(indices, pa.int64()),
            "image": pa.array([encode_png(im) for im in b["images"]], pa.binary()),
            "caption": pa.array(b["captions"], pa.string()),
            "aesthetic": pa.array(b["aesthetic"], pa.float32()),
            "split": pa.array([split] * len(indices), pa.string()),
        },
        schema=_SCHEMA.with_metadata({"seed": str(seed)}),
    )


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write a table to a temporary file next to ``path`` and rename it into place, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_shards(
    out_dir: str | os.PathLike,
    split: str,
    n: int,
    shard_size: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Write samples 0..n-1 of ``split`` as ``{split}-{k:05d}.parquet`` shards (other shards of the split in
    out_dir are removed); return their paths in order."""
    if n < 0 or shard_size <= 0:
        raise ValueError(f"need n >= 0 and shard_size > 0, got n={n}, shard_size={shard_size}")
    check_split_index(split, max(n - 1, 0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    starts = range(0, n, shard_size)
    bar = None
    if progress:
        from tqdm import tqdm  # optional dependency of the CLI only

        bar = tqdm(total=n, desc=f"tinyworld {split}", unit="img")
    paths = []
    for k, start in enumerate(starts):
        indices = list(range(start, min(start + shard_size, n)))
        path = out / f"{split}-{k:05d}.parquet"
        _write_atomic(_shard_table(indices, split, seed), path)
        paths.append(path)
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    for stale in set(out.glob(f"{split}-*.parquet")) - set(paths):  # shards of an earlier, larger write
        stale.unlink()
    return paths


def read_parquet_shard(path: str | os.PathLike) -> dict:
    """Read one shard into a dict like :func:`batch` (plus ``indices`` and ``split``); ValueError if unreadable."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read TinyWorld parquet shard {path}: {e}") from e
    missing = set(_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"TinyWorld parquet shard {path} lacks columns {sorted(missing)}")
    cols = table.to_pydict()
    try:
        images = [decode_png(b) for b in cols["image"]]
    except (OSError, ValueError) as e:
        raise ValueError(f"TinyWorld parquet shard {path} holds an undecodable PNG: {e}") from e
    splits = set(cols["split"])
    return {
        "images": np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        "captions": list(cols["caption"]),
        "aesthetic": np.asarray(cols["aesthetic"], dtype=np.float32),
        "indices": np.asarray(cols["index"], dtype=np.int64),
        "split": splits.pop() if len(splits) == 1 else None,
    }


def parquet_shards(folder: str | Path, split: str | None = None) -> list[Path]:
    """The .parquet files of a folder (optionally only those of one split), sorted."""
    files = sorted(Path(folder).glob(f"{split or ''}*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split or ''}*.parquet shards in {folder}")
    return files


def row_counts(files: list[Path]) -> list[int]:
    """Rows per Parquet file, from the footers only (no data read)."""
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def read_rows(folder: str | Path, split: str, start: int, stop: int) -> tuple[Tensor, list[str]]:
    """Images in [-1, 1] and prompts of rows [start, stop) of a split, across its sorted Parquet files
    (the row order of rlstitch.data.probe.load_images); only the files that overlap the range are read."""
    files = parquet_shards(folder, split)
    images, captions, offset = [], [], 0
    for f, rows in zip(files, row_counts(files)):
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            b = read_parquet_shard(f)
            images.append(to_tensor(b["images"][lo - offset : hi - offset]))
            captions += b["captions"][lo - offset : hi - offset]
        offset += rows
        if offset >= stop:
            break
    if len(captions) != stop - start:
        raise ValueError(f"{folder}: {split} rows [{start}, {stop}) requested, only {offset} rows in "
                         f"{len(files)} files: lower probe_images / finetune.train_images or add shards")
    return torch.cat(images), captions


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """CLI entry point: write parquet shards of one split."""
    p = argparse.ArgumentParser(description="Write TinyWorld samples as parquet shards.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="train", choices=sorted(SPLIT_IDS))
    p.add_argument("--n", type=int, required=True, help="number of samples (indices 0..n-1)")
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    size = SPLIT_SIZES[args.split]
    if size is not None and args.n > size:
        p.error(f"split {args.split!r} holds only {size} samples, asked for --n {args.n}")
    paths = write_parquet_shards(args.out, args.split, args.n, args.shard_size, args.seed, progress=True)
    print(f"wrote {len(paths)} shards to {args.out}")
    return paths


if __name__ == "__main__":
    main()
