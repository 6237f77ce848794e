"""Weights fingerprints: a stitch records the backbone and reward it was fitted to, and checks them on load."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def fingerprint(module: nn.Module, sample: int = 4096) -> str:
    """SHA-256 over every tensor's name, shape, dtype and a strided sample of its values (fast on 10 GB)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def same_module_weights(a: nn.Module, b: nn.Module) -> bool:
    """True when two modules hold identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
