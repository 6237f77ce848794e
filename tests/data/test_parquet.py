"""Parquet shards of the tiny world: the round trip, stale shards, corrupt files, the CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rlstitch.data import parquet
from rlstitch.data import scenes as tw


def test_parquet_round_trip(tmp_path) -> None:
    """Shards decode to exactly what batch() generates, and no temporary files remain."""
    paths = parquet.write_parquet_shards(tmp_path, "val", n=10, shard_size=4, seed=2)
    assert [p.name for p in paths] == ["val-00000.parquet", "val-00001.parquet", "val-00002.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    shards = [parquet.read_parquet_shard(p) for p in paths]
    want = tw.batch(range(10), "val", seed=2)
    np.testing.assert_array_equal(np.concatenate([s["images"] for s in shards]), want["images"])
    assert sum((s["captions"] for s in shards), []) == want["captions"]
    np.testing.assert_array_equal(np.concatenate([s["aesthetic"] for s in shards]), want["aesthetic"])
    np.testing.assert_array_equal(np.concatenate([s["indices"] for s in shards]), np.arange(10))
    assert {s["split"] for s in shards} == {"val"}


def test_rewriting_fewer_shards_removes_the_stale_ones(tmp_path) -> None:
    """A smaller rewrite leaves only its own shards of that split (readers glob the folder); other splits stay."""
    parquet.write_parquet_shards(tmp_path, "train", n=10, shard_size=4)
    parquet.write_parquet_shards(tmp_path, "val", n=3, shard_size=4)
    paths = parquet.write_parquet_shards(tmp_path, "train", n=5, shard_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.parquet", "train-00001.parquet",
                                                          "val-00000.parquet"]
    assert sum(len(parquet.read_parquet_shard(p)["captions"]) for p in paths) == 5


def test_corrupt_parquet_raises_value_error(tmp_path) -> None:
    """Unreadable shards raise a ValueError naming the file."""
    (path,) = parquet.write_parquet_shards(tmp_path, "test", n=3, shard_size=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        parquet.read_parquet_shard(path)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match="garbage.parquet"):
        parquet.read_parquet_shard(garbage)


def test_cli(tmp_path, capsys) -> None:
    """The CLI writes the requested shards."""
    paths = parquet.main(["--out", str(tmp_path), "--split", "test", "--n", "5", "--shard-size", "2"])
    assert len(paths) == 3 and all(p.exists() for p in paths)
    assert "wrote 3 shards" in capsys.readouterr().out
