"""Closed-form stitch fits y = x W + b_p from StitchStats, residual table and pair selection (SPEC §1)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rlstitch.io import atomic_write
from rlstitch.stitch.stats import StitchStats

_F64 = torch.float64


@dataclass
class LinearFit:
    """A per-token linear stitch W [d_u, d_r] with a per-position intercept bias [P, d_r]."""

    W: Tensor
    bias: Tensor
    rel_residual: float
    i: int
    j: int

    def apply(self, x: Tensor) -> Tensor:
        """x [B, P, d_u] -> x W + bias [B, P, d_r], computed in float64, returned in x's float dtype."""
        y = x.to(_F64) @ self.W.to(x.device) + self.bias.to(x.device)
        return y.to(x.dtype) if x.is_floating_point() else y


def _centred(stats: StitchStats, i: int, j: int) -> tuple[Tensor, Tensor, float]:
    """Position-centred Cxx, Cxy and Cyy (one intercept per token position)."""
    n, sx, sy = stats.n, stats.sum_x[i], stats.sum_y[j]
    cxx = stats.xtx[i] - sx.T @ sx / n
    cxy = stats.xty[(i, j)] - sx.T @ sy / n
    cyy = float(stats.yy[j] - sy.square().sum() / n)
    return cxx, cxy, cyy


def _ridge_solve(a: Tensor, b: Tensor) -> Tensor:
    """a^-1 b for symmetric PSD a; pseudo-inverse if a is singular (e.g. ridge 0 with collinear X)."""
    try:
        return torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError:
        return torch.linalg.pinv(a, hermitian=True) @ b


def solve(stats: StitchStats, i: int, j: int, ridge: float = 1e-6) -> LinearFit:
    """Least-squares fit of Y_j from X_i with per-position intercepts and ridge*tr(Cxx)/d_u on W only."""
    if stats.n == 0:
        raise ValueError("cannot solve from empty StitchStats (n == 0)")
    if i not in stats.xtx or j not in stats.yy:
        raise ValueError(f"pair ({i}, {j}) not among blocks_u={stats.blocks_u} x blocks_r={stats.blocks_r}")
    cxx, cxy, cyy = _centred(stats, i, j)
    # Ridge scaled by the mean feature variance so lambda is unit-free across blocks.
    reg = ridge * torch.trace(cxx) / stats.d_u
    W = _ridge_solve(cxx + reg * torch.eye(stats.d_u, dtype=_F64), cxy)
    bias = (stats.sum_y[j] - stats.sum_x[i] @ W) / stats.n
    # ||X W + b - Y||^2 = Cyy - 2 tr(W^T Cxy) + tr(W^T Cxx W): the optimal b_p centres each position.
    res = cyy - 2.0 * float((W * cxy).sum()) + float((W * (cxx @ W)).sum())
    denom = float(stats.yy[j] - stats.sum_y[j].sum(0).square().sum() / stats.tokens)
    # Constant Y (denom 0) is reproduced exactly by the intercepts.
    rel = max(res, 0.0) / denom if denom > 0 else 0.0
    return LinearFit(W=W, bias=bias, rel_residual=rel, i=i, j=j)


def solve_all(stats: StitchStats, ridge: float = 1e-6) -> dict[tuple[int, int], LinearFit]:
    """Fits every candidate pair (i in blocks_u, j in blocks_r)."""
    return {(i, j): solve(stats, i, j, ridge) for i in stats.blocks_u for j in stats.blocks_r}


def _rank(fit: LinearFit) -> tuple[float, int, int]:
    """Sort key: lowest residual first (NaN last), ties broken by (i, j) for determinism."""
    r = fit.rel_residual
    return (math.inf if math.isnan(r) else r, fit.i, fit.j)


def select(fits: dict[tuple[int, int], LinearFit], j_max: int, i_tolerance: float = 0.0) -> LinearFit:
    """The pair with the lowest relative residual among j <= j_max (SPEC: early reward cuts only).

    With i_tolerance > 0, the shallowest DiT cut whose residual is within (1 + i_tolerance) of the best is
    taken instead: the residual flattens with depth while the value model's cost grows with every block.
    """
    allowed = [f for (_, j), f in fits.items() if j <= j_max]
    if not allowed:
        raise ValueError(f"no candidate pair with j <= {j_max} (have j in {sorted({j for _, j in fits})})")
    best = min(allowed, key=_rank)
    if i_tolerance <= 0:
        return best
    near = [f for f in allowed if f.rel_residual <= best.rel_residual * (1 + i_tolerance)]
    return min(near, key=lambda f: (f.i, *_rank(f)))


def _grid(fits: dict[tuple[int, int], LinearFit]) -> tuple[list[int], list[int]]:
    """Sorted row (i) and column (j) labels."""
    return sorted({i for i, _ in fits}), sorted({j for _, j in fits})


def residual_table(fits: dict[tuple[int, int], LinearFit], chosen: LinearFit | None = None) -> str:
    """Text table of relative residuals (rows i, columns j); '*' marks the chosen pair."""
    rows, cols = _grid(fits)
    lines = ["i \\ j " + "".join(f"{j:>10d}" for j in cols)]
    for i in rows:
        cells = []
        for j in cols:
            f = fits.get((i, j))
            mark = "*" if chosen is not None and (chosen.i, chosen.j) == (i, j) else " "
            cells.append(f"{'-':>9s} " if f is None else f"{f.rel_residual:9.4f}{mark}")
        lines.append((f"{i:<6d}" + "".join(cells)).rstrip())
    return "\n".join(lines)


def plot_residuals(fits: dict[tuple[int, int], LinearFit], path: str | os.PathLike,
                   chosen: LinearFit | None = None) -> None:
    """Heat map PNG of relative residuals, chosen pair boxed (default: best over all j); atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot global state
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows, cols = _grid(fits)
    chosen = chosen if chosen is not None else select(fits, max(cols))
    grid = [[fits[(i, j)].rel_residual if (i, j) in fits else math.nan for j in cols] for i in rows]
    fig = Figure(figsize=(1.0 + 0.8 * len(cols), 1.0 + 0.6 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    top = max((v for row in grid for v in row if not math.isnan(v)), default=1.0)
    fig.colorbar(im, ax=ax, label="relative residual")
    for (r, c), v in np.ndenumerate(np.array(grid)):
        if not math.isnan(v):  # dark text on the light (low-residual) end of viridis_r
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7, color="k" if v < top / 2 else "w")
    ax.add_patch(Rectangle((cols.index(chosen.j) - 0.5, rows.index(chosen.i) - 0.5), 1, 1,
                           fill=False, edgecolor="red", linewidth=2.5))
    ax.set(xticks=range(len(cols)), xticklabels=cols, yticks=range(len(rows)), yticklabels=rows,
           xlabel="reward block j", ylabel="DiT block i",
           title=f"stitch residuals (chosen i={chosen.i}, j={chosen.j})")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"), ".png")
