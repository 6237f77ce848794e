"""Distributed stitch statistics: shards, Parquet rows, the exact distributed fit and a crashed worker."""

from __future__ import annotations

import os

import pytest
import torch

N, BATCH, J_MAX, SEED = 32, 4, 2, 1  # 8 probe batches -> 2 workers x 2 shards of 2 batches


def test_plan_shards_cover_the_probe_set_on_batch_boundaries():
    from rlstitch.data.probe import plan_shards

    shards = plan_shards(26, 4, 4, seed=3)  # 7 batches over 4 shards
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 12), (12, 20), (20, 26)]
    assert all(s.start % 4 == 0 for s in shards) and sum(s.images for s in shards) == 26
    with pytest.raises(ValueError, match="lower stats.workers or stats.shards_per_worker"):
        plan_shards(8, 4, 3, seed=0)


def test_shard_batches_reproduce_image_batches(tmp_path):
    """Same rows and same noise seeds as the single-process probe stream, whatever the file layout."""
    from rlstitch.data import parquet as tw
    from rlstitch.data.parquet import read_rows
    from rlstitch.data.probe import image_batches, plan_shards, shard_batches

    tw.write_parquet_shards(tmp_path, "train", 22, shard_size=5, seed=SEED)
    want = list(image_batches("tinyworld", 22, BATCH, SEED))
    got = [b for s in plan_shards(22, BATCH, 3, SEED)
           for b in shard_batches(s, read_rows(tmp_path, "train", s.start, s.stop)[0])]
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only 22 rows"):
        read_rows(tmp_path, "train", 20, 30)


def _distributed(folder, world, fail_once: str = ""):
    """Statistics of the probe folder from 2 stats workers x 2 shards."""
    from actors.group import ActorGroup
    from actors.stats import StatsWorker, collect_distributed
    from rlstitch.data.probe import plan_shards
    from rlstitch.placement import RoleSpec

    models = {"backbone": "tiny-sd3", "reward": "tiny-clip"}
    group = ActorGroup(StatsWorker, RoleSpec(num_workers=2, num_cpus=1), models, str(folder), J_MAX,
                       {"RLSTITCH_TINY_DIR": str(world)}, 1, fail_once, role="stats")
    try:
        group.call("ready", timeout=900)  # model loading is slow on a busy 2-core machine
        tags = {"role": "stats", "recipe": "test", "run": "test"}
        return collect_distributed(group, plan_shards(N, BATCH, 4, SEED), tags, merge_group=2, progress=False)
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def probe(random_world, tmp_path_factory):
    """The probe set as Parquet (7-row files: shards straddle files) and the single-process statistics."""
    from rlstitch.data import parquet as tw
    from rlstitch.data.probe import image_batches
    from rlstitch.stitch.build import StitchBuildConfig, load_models
    from rlstitch.stitch.collect import collect_stats

    folder = tmp_path_factory.mktemp("probe")
    tw.write_parquet_shards(folder, "train", N, shard_size=7, seed=SEED)
    bb, rw, codec = load_models(StitchBuildConfig(backbone="tiny-sd3", reward="tiny-clip"))
    latent_hw = tuple(codec.encode(torch.zeros(1, 3, 32, 32)).shape[-2:])
    batches = image_batches("tinyworld", N, BATCH, SEED)
    single = collect_stats(bb, rw, codec, batches, J_MAX, latent_hw, progress=False)
    return folder, single


@pytest.fixture(scope="module")
def distributed(probe, random_world, ray_local):
    """The distributed statistics without failures."""
    return _distributed(probe[0], random_world)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius difference."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.slow
def test_distributed_fit_equals_single_process_fit(probe, distributed):
    from rlstitch.stitch.fit import select, solve_all

    _, single = probe
    stats, rep = distributed
    assert stats.n == N and stats.tokens == N * single.positions  # every probe token exactly once
    assert rep.shards == 4 and rep.retried == 0 and rep.images == N
    fits_d, fits_s = solve_all(stats, 1e-4), solve_all(single, 1e-4)
    for key, fs in fits_s.items():
        fd = fits_d[key]
        assert _rel(fd.W, fs.W) < 1e-8 and _rel(fd.bias, fs.bias) < 1e-8, key
        assert abs(fd.rel_residual - fs.rel_residual) <= 1e-8 * max(fs.rel_residual, 1e-12), key
    bd, bs = select(fits_d, J_MAX), select(fits_s, J_MAX)
    assert (bd.i, bd.j) == (bs.i, bs.j)
    torch.testing.assert_close(stats.sum_cls[bs.j], single.sum_cls[bs.j], rtol=1e-12, atol=0)


@pytest.mark.slow
def test_crashed_stats_worker_gives_the_identical_fit(probe, distributed, random_world, ray_local, tmp_path):
    """Worker 0 dies (os._exit) on its first shard; Ray restarts it, the shard is redone and counted once."""
    marker = tmp_path / "crashed"
    stats, rep = _distributed(probe[0], random_world, fail_once=str(marker))
    assert marker.is_file() and "killed pid" in marker.read_text()
    assert stats.n == N and rep.images == N
    ref, _ = distributed
    # Shard-ordered merging makes the result independent of who ran what: bit-identical statistics.
    for name in ("sum_x", "xtx", "sum_y", "yy", "sum_cls", "xty"):
        for k, v in getattr(ref, name).items():
            assert torch.equal(getattr(stats, name)[k], v), (name, k)
    assert os.path.exists(marker)


def test_collect_without_shards_or_with_empty_ones_is_a_clear_error():
    from actors.stats import collect_distributed
    from rlstitch.data.probe import ProbeShard

    class NoWorkers(list):
        workers: list = []

    tags = {"role": "stats", "recipe": "test", "run": "test"}
    with pytest.raises(ValueError, match="no probe shards to collect"):
        collect_distributed(NoWorkers(), [], tags, progress=False)
    with pytest.raises(ValueError, match=r"probe shard 1 \(rows 4\.\.4\) is empty"):
        collect_distributed(NoWorkers(), [ProbeShard(0, 0, 4, 4, 0), ProbeShard(1, 4, 4, 4, 0)], tags, progress=False)


@pytest.mark.parametrize("count,group", [(1, 2), (5, 2), (8, 2), (7, 3)])
def test_ordered_merge_is_independent_of_arrival_order(count, group):
    from actors.stats import _OrderedMerge
    from rlstitch.stitch.stats import StitchStats

    g = torch.Generator().manual_seed(count)
    parts = []
    for _ in range(count):
        s = StitchStats([1, 2], [0], d_u=3, d_r=2, positions=4)
        feats_u = {i: torch.randn(2, 4, 3, generator=g) for i in (1, 2)}
        s.update(feats_u, {0: torch.randn(2, 4, 2, generator=g)})
        parts.append(s)
    results = []
    for seed in range(3):
        m = _OrderedMerge(count, group)
        for k in torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist():
            m.add(k, parts[k])
        results.append(m.result())
    ref = StitchStats.merge_all(parts)
    for r in results:
        assert r.n == 2 * count
        for (i, j), v in ref.xty.items():
            assert torch.equal(r.xty[(i, j)], results[0].xty[(i, j)])  # bit-identical for any order
            torch.testing.assert_close(r.xty[(i, j)], v, rtol=1e-12, atol=1e-12)
