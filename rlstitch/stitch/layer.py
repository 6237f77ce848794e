"""The stitching layer s_psi (SPEC §1): y = Up(F h) + pos, out = y + G(y), then [CLS] prepended.

F is a per-token linear map d_u -> d_r initialised from the closed-form fit, Up a fixed bilinear resample
from the DiT's token grid onto the reward's patch grid, pos the fit's per-position intercept (the stitched
tokens' positional embedding), and G = Conv1x1 . SiLU . Conv1x1 . SiLU with a d_r/8 bottleneck whose last
conv starts at zero, so at step 0 the layer is exactly the linear fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resample_tokens(x: Tensor, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> Tensor:
    """Bilinear resample of tokens [B, h*w, d] from grid_in to grid_out (identity when equal)."""
    if tuple(grid_in) == tuple(grid_out):
        return x
    b, n, d = x.shape
    if n != grid_in[0] * grid_in[1]:
        raise ValueError(f"{n} tokens do not form a {grid_in} grid")
    img = x.transpose(1, 2).reshape(b, d, *grid_in)
    img = F.interpolate(img, size=tuple(grid_out), mode="bilinear", align_corners=False, antialias=True)
    return img.flatten(2).transpose(1, 2)


class StitchLayer(nn.Module):
    """Maps DiT tokens [B, h_u*w_u, d_u] to reward tokens [B, 1 + h_r*w_r, d_r] ([CLS] first)."""

    def __init__(self, d_u: int, d_r: int, grid_u: tuple[int, int], grid_r: tuple[int, int]):
        super().__init__()
        self.d_u, self.d_r = d_u, d_r
        self.grid_u, self.grid_r = tuple(grid_u), tuple(grid_r)
        self.proj = nn.Linear(d_u, d_r, bias=False)  # F (a 1x1 conv is a per-token linear map)
        self.pos = nn.Parameter(torch.zeros(grid_r[0] * grid_r[1], d_r))
        self.cls = nn.Parameter(torch.zeros(d_r))
        hidden = max(1, d_r // 8)
        self.residual = nn.Sequential(nn.SiLU(), nn.Linear(d_r, hidden), nn.SiLU(), nn.Linear(hidden, d_r))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    @torch.no_grad()
    def init_from_fit(self, W: Tensor, bias: Tensor, cls: Tensor) -> None:
        """Set F, pos and [CLS] from the closed-form fit (W [d_u, d_r], bias [P, d_r]) and the mean [CLS]."""
        if tuple(W.shape) != (self.d_u, self.d_r) or tuple(bias.shape) != tuple(self.pos.shape):
            raise ValueError(
                f"fit shapes W {tuple(W.shape)} bias {tuple(bias.shape)} do not match the layer "
                f"(d_u={self.d_u}, d_r={self.d_r}, positions={self.pos.shape[0]})"
            )
        self.proj.weight.copy_(W.T.to(self.proj.weight.dtype))
        self.pos.copy_(bias.to(self.pos.dtype))
        self.cls.copy_(cls.to(self.cls.dtype))

    def forward(self, h: Tensor) -> Tensor:
        """DiT tokens -> the reward's token sequence entering block j."""
        n = self.grid_u[0] * self.grid_u[1]
        # Equal grids skip the resample, whose check would otherwise catch a latent of another resolution.
        if h.dim() != 3 or h.shape[1:] != (n, self.d_u):
            raise ValueError(f"stitch expects DiT tokens [B, {n}, {self.d_u}] (grid {self.grid_u}), got "
                             f"{tuple(h.shape)}: the latent's resolution differs from the one it was built for")
        y = resample_tokens(self.proj(h.to(self.proj.weight.dtype)), self.grid_u, self.grid_r) + self.pos
        y = y + self.residual(y)
        return torch.cat([self.cls.expand(y.shape[0], 1, -1), y], dim=1)
