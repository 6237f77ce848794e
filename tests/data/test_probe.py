"""Probe images from a Parquet folder: the same batches and noise seeds as the tiny world's stream."""

import pytest
import torch

from rlstitch.data import parquet as tw
from rlstitch.data import probe

SEED = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """23 train rows in 7-row shards (batches straddle shard boundaries)."""
    out = tmp_path_factory.mktemp("parquet")
    tw.write_parquet_shards(out, "train", 23, shard_size=7, seed=SEED)
    return out


@pytest.mark.parametrize(("n", "batch"), [(23, 4), (20, 5), (9, 16), (14, 7)])
def test_parquet_batches_equal_the_tinyworld_stream(folder, n, batch):
    got = list(probe.image_batches(str(folder), n, batch, SEED))
    want = list(probe.image_batches("tinyworld", n, batch, SEED))
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert torch.equal(a, b)


def test_each_shard_is_read_once(folder, monkeypatch):
    reads = []
    real = tw.read_parquet_shard
    monkeypatch.setattr(tw, "read_parquet_shard", lambda f: reads.append(f) or real(f))
    assert sum(len(x) for _, x in probe.image_batches(str(folder), 23, 2, SEED)) == 23
    assert len(reads) == len(set(reads)) == 4


def test_too_few_parquet_images_is_a_clear_error(folder):
    with pytest.raises(ValueError, match="only 23 train images, 30 requested"):
        list(probe.image_batches(str(folder), 30, 4, SEED))
