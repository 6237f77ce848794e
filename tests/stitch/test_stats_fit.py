"""Stage 1 stitch statistics and closed-form fits against direct numpy least squares (SPEC §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlstitch.stitch.fit import LinearFit, plot_residuals, residual_table, select, solve, solve_all
from rlstitch.stitch.stats import StitchStats

BU, BR, DU, DR, P = [1, 2, 3], [0, 1, 2], 6, 4, 5


def _data(seed: int, n: int = 40, planted: tuple[int, int] | None = None):
    """X_i with per-position means; Y_j = X_i M + b_p + noise; Y_planted exactly linear in X_i (no noise)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    xs = {i: rn(n, P, DU) + rn(P, DU) for i in BU}
    ys = {j: xs[BU[j % len(BU)]] @ rn(DU, DR) + rn(P, DR) + 0.5 * rn(n, P, DR) for j in BR}
    if planted is not None:
        ys[planted[1]] = xs[planted[0]] @ rn(DU, DR) + rn(P, DR)
    return xs, ys


def _stats(xs, ys, shards: int = 1) -> list[StitchStats]:
    """One StitchStats per contiguous shard of the images."""
    out = []
    for rows in torch.arange(next(iter(xs.values())).shape[0]).chunk(shards):
        s = StitchStats(BU, BR, DU, DR, P)
        s.update({i: x[rows] for i, x in xs.items()}, {j: y[rows] for j, y in ys.items()})
        out.append(s)
    return out


def _rel(a, b) -> float:
    """Relative difference ||a - b|| / ||b||."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _same(a: StitchStats, b: StitchStats, tol: float = 1e-12) -> None:
    """Asserts equal counts and all sums equal to float64 rounding."""
    assert a.n == b.n and a.tokens == b.tokens
    for name in ("sum_x", "xtx", "sum_y", "yy", "xty"):
        for k, v in getattr(a, name).items():
            torch.testing.assert_close(v, getattr(b, name)[k], rtol=tol, atol=tol)


def test_merged_shards_match_lstsq():
    xs, ys = _data(0)
    stats = StitchStats.merge_all(_stats(xs, ys, shards=4))
    for i, j in [(1, 0), (2, 1), (3, 2), (1, 2)]:
        fit = solve(stats, i, j, ridge=0.0)
        X, Y = xs[i].reshape(-1, DU).numpy(), ys[j].reshape(-1, DR).numpy()
        onehot = np.tile(np.eye(P), (xs[i].shape[0], 1))
        coef = np.linalg.lstsq(np.hstack([X, onehot]), Y, rcond=None)[0]
        assert _rel(fit.W, coef[:DU]) < 1e-8 and _rel(fit.bias, coef[DU:]) < 1e-8
        pred = fit.apply(xs[i]).reshape(-1, DR).numpy()
        direct = ((pred - Y) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
        assert abs(fit.rel_residual - direct) / direct < 1e-8
        assert 0.01 < fit.rel_residual < 0.99


def test_merge_order_independent_and_equals_single_pass():
    xs, ys = _data(1, n=30)
    a, b, c = _stats(xs, ys, shards=3)
    single = _stats(xs, ys)[0]
    merged = [a.merge(b).merge(c), a.merge(b.merge(c)), c.merge(b).merge(a), StitchStats.merge_all([a, b, c])]
    for m in merged:
        _same(m, single)
    assert a.n == 10 and single.tokens == 30 * P  # merge built new objects


def test_float32_input_accumulates_in_float64():
    xs, ys = _data(2, n=8)
    s = StitchStats(BU, BR, DU, DR, P)
    s.update({i: x.float() for i, x in xs.items()}, {j: y.float() for j, y in ys.items()})
    assert all(t.dtype == torch.float64 for t in [*s.xtx.values(), *s.xty.values(), *s.yy.values()])
    x = xs[1].float().double().reshape(-1, DU)
    torch.testing.assert_close(s.xtx[1], x.T @ x, rtol=1e-13, atol=1e-12)


def test_save_load_round_trip_and_corruption(tmp_path):
    xs, ys = _data(3, n=12)
    s = _stats(xs, ys)[0]
    path = tmp_path / "stats.safetensors"
    s.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]  # no temp file left over
    loaded = StitchStats.load(path)
    assert (loaded.blocks_u, loaded.blocks_r, loaded.d_u, loaded.d_r, loaded.positions) == (BU, BR, DU, DR, P)
    _same(loaded, s, tol=0.0)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        StitchStats.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="missing.safetensors"):
        StitchStats.load(tmp_path / "missing.safetensors")


def test_invalid_inputs_raise():
    xs, ys = _data(4, n=4)
    s = StitchStats(BU, BR, DU, DR, P)
    with pytest.raises(ValueError, match="blocks"):
        s.merge(StitchStats([1, 2], BR, DU, DR, P))
    bad = dict(xs)
    bad[2] = xs[2].clone()
    bad[2][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="DiT block 2"):
        s.update(bad, ys)
    with pytest.raises(ValueError, match=r"reward block 1: shape \(4, 5, 3\)"):
        s.update(xs, {**ys, 1: ys[1][..., :3]})
    with pytest.raises(ValueError, match="blocks"):
        s.update({1: xs[1]}, ys)
    assert s.n == 0 and float(s.xtx[1].abs().sum()) == 0.0  # failed updates leave no partial sums
    with pytest.raises(ValueError, match="empty"):
        solve(s, 1, 0)


def test_select_finds_planted_pair_within_j_max(tmp_path):
    xs, ys = _data(5, planted=(2, 1))
    fits = solve_all(StitchStats.merge_all(_stats(xs, ys, shards=2)), ridge=0.0)
    assert set(fits) == {(i, j) for i in BU for j in BR}
    best = select(fits, j_max=1)
    assert (best.i, best.j) == (2, 1) and best.rel_residual < 1e-10
    assert select(fits, j_max=0).j == 0
    with pytest.raises(ValueError):
        select(fits, j_max=-1)
    tie = {(i, 0): LinearFit(torch.eye(2), torch.zeros(1, 2), 0.5, i, 0) for i in (3, 1, 2)}
    assert select(tie, j_max=0).i == 1
    table = residual_table(fits, chosen=best)
    assert len(table.splitlines()) == 1 + len(BU) and "*" in table.splitlines()[2]
    plot_residuals(fits, tmp_path / "res.png", chosen=best)
    assert (tmp_path / "res.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ridge_matches_closed_form_on_centred_data():
    xs, ys = _data(6, n=20)
    stats = _stats(xs, ys)[0]
    lam = 0.3
    fit = solve(stats, 3, 2, ridge=lam)
    X, Y = xs[3].numpy(), ys[2].numpy()
    mx, my = X.mean(0), Y.mean(0)  # per-position means [P, d]
    Xc, Yc = (X - mx).reshape(-1, DU), (Y - my).reshape(-1, DR)
    cxx = Xc.T @ Xc
    W = np.linalg.solve(cxx + lam * np.trace(cxx) / DU * np.eye(DU), Xc.T @ Yc)
    assert _rel(fit.W, W) < 1e-10 and _rel(fit.bias, my - mx @ W) < 1e-10
    Yf = Y.reshape(-1, DR)
    direct = ((fit.apply(xs[3]).numpy() - Y) ** 2).sum() / ((Yf - Yf.mean(0)) ** 2).sum()
    assert abs(fit.rel_residual - direct) / direct < 1e-8
    assert fit.rel_residual > solve(stats, 3, 2, ridge=0.0).rel_residual  # the ridge costs fit


def test_select_with_depth_tolerance_prefers_the_shallowest_near_best_cut():
    import torch

    from rlstitch.stitch.fit import LinearFit, select

    res = {(1, 0): 0.50, (2, 0): 0.37, (4, 0): 0.36, (8, 0): 0.355, (8, 1): 0.30}
    fits = {k: LinearFit(torch.zeros(1, 1), torch.zeros(1, 1), r, *k) for k, r in res.items()}
    assert (select(fits, 0).i, select(fits, 0).j) == (8, 0)  # SPEC: the lowest residual
    assert (select(fits, 0, 0.05).i, select(fits, 0, 0.05).j) == (2, 0)  # 0.37 <= 0.355 * 1.05
    assert select(fits, 0, 0.01).i == 8
    assert (select(fits, 1, 0.05).i, select(fits, 1, 0.05).j) == (8, 1)  # nothing else within 5% of 0.30


def test_bad_cls_tokens_raise_and_leave_no_partial_sums():
    """cls_r is checked like the features (blocks, [B, d_r], finite) before anything is accumulated."""
    xs, ys = _data(7, n=4)
    s = StitchStats(BU, BR, DU, DR, P)
    good = {j: torch.randn(4, DR, dtype=torch.float64) for j in BR}
    bad_cases = [
        ({j: good[j] for j in BR[:-1]}, "reward \\[CLS\\] has blocks"),
        ({**good, 1: good[1][:3]}, r"reward \[CLS\] block 1: shape \(3, 4\), expected \[4, 4\]"),
        ({**good, 1: good[1][:, :1]}, r"reward \[CLS\] block 1: shape \(4, 1\)"),
        ({**good, 2: torch.full((4, DR), float("nan"))}, r"reward \[CLS\] block 2: non-finite"),
    ]
    for cls, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            s.update(xs, ys, cls)
    assert s.n == 0 and float(s.xtx[1].abs().sum()) == 0.0 and float(s.sum_cls[0].abs().sum()) == 0.0
    s.update(xs, ys, good)
    torch.testing.assert_close(s.sum_cls[1], good[1].sum(0))
