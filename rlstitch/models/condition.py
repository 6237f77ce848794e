"""Text conditioning of a diffusion transformer: token states plus a pooled vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Condition:
    """What a DiT is conditioned on: per-token text states [B, L, D] and a pooled vector [B, P]."""

    tokens: Tensor
    pooled: Tensor

    def __post_init__(self):
        if self.tokens.dim() != 3 or self.pooled.dim() != 2 or self.tokens.shape[0] != self.pooled.shape[0]:
            raise ValueError(
                f"Condition needs tokens [B, L, D] and pooled [B, P] with one B, got "
                f"{tuple(self.tokens.shape)} and {tuple(self.pooled.shape)}"
            )

    @property
    def batch_size(self) -> int:
        """Number of conditions in the batch."""
        return self.tokens.shape[0]

    def expand(self, batch_size: int) -> Condition:
        """Broadcast a single condition to a batch (no copy)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a condition batch of {self.batch_size} to {batch_size}")
        return Condition(self.tokens.expand(batch_size, -1, -1), self.pooled.expand(batch_size, -1))

    def repeat_interleave(self, n: int) -> Condition:
        """Repeat each condition n times (for groups of samples per prompt)."""
        return Condition(self.tokens.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def to(self, device=None, dtype=None) -> Condition:
        """Move to a device / cast."""
        return Condition(self.tokens.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype))

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        """Concatenate along the batch."""
        return Condition(torch.cat([c.tokens for c in conds]), torch.cat([c.pooled for c in conds]))
