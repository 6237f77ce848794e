"""Where a model lives: every layer (sampling, value, stitch, eval) places tensors with this one helper."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """Where a model's parameters live (cpu for parameter-free stand-ins)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
