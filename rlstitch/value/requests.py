"""Value requests, Ray-free: validation, batching by latent size, and splitting results back per request.

A request is {"z": latents [B, C, H, W], "t": float or [B], "prompts": list of B strings or None}. A bad request
(shape, dtype, NaN/Inf, t outside [0, 1], prompt count) raises a ValueError naming the request and the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlstitch.value.base import check_latent

REQUEST_KEYS = {"z", "t", "prompts"}


@dataclass
class Batch:
    """Requests of one latent size concatenated along the batch, with the sizes to split the results back."""

    z: Tensor
    t: Tensor
    prompts: list[str] | None
    sizes: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # the position of each request in the caller's list


def expected_hw(model) -> tuple[int, int] | None:
    """The latent size a StitchVM accepts (its stitch grid times the DiT patch), None when any size works."""
    layer, backbone = getattr(model, "layer", None), getattr(model, "backbone", None)
    if layer is None or not hasattr(backbone, "patch_size"):
        return None
    return layer.grid_u[0] * backbone.patch_size, layer.grid_u[1] * backbone.patch_size


def parse_request(req: Any, index: int, model) -> tuple[Tensor, Tensor, list[str] | None]:
    """(z, t [B], prompts) of one request, or a ValueError naming request `index` and the problem."""
    where = f"value request {index}"
    if not isinstance(req, Mapping):
        raise ValueError(f"{where}: must be a dict with keys z, t, prompts, got {type(req).__name__}")
    if not {"z", "t"} <= set(req) or set(req) - REQUEST_KEYS:
        raise ValueError(f"{where}: keys must be z, t and optionally prompts, got {sorted(req)}")
    z = req["z"]
    if isinstance(z, Tensor) and z.dtype in (torch.float16, torch.bfloat16, torch.float64):
        z = z.float()
    try:
        t = check_latent(z, req["t"], model.latent_channels, where)
    except (TypeError, RuntimeError) as e:  # e.g. a t that is not a number
        raise ValueError(f"{where}: bad t {req['t']!r} ({e})") from None
    if z.dtype != torch.float32:
        raise ValueError(f"{where}: latent dtype must be a float type, got {z.dtype}")
    hw = expected_hw(model)
    if hw is not None and tuple(z.shape[-2:]) != hw:
        raise ValueError(f"{where}: latent must be [B, {model.latent_channels}, {hw[0]}, {hw[1]}], got {tuple(z.shape)}")
    return z, t.cpu(), _prompts(req.get("prompts"), len(z), where, model)


def _prompts(prompts, n: int, where: str, model) -> list[str] | None:
    """Validated prompts: one string per latent (prompt-free rewards accept None)."""
    if prompts is None:
        if getattr(model.reward, "kind", "") == "clip":
            raise ValueError(f"{where}: the {model.reward.name} reward needs one prompt per latent, got none")
        return None
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{where}: prompts must be a list of strings")
    if len(prompts) != n:
        raise ValueError(f"{where}: got {len(prompts)} prompts for a batch of {n} latents")
    return list(prompts)


def batch_requests(requests: Sequence, model) -> list[Batch]:
    """Validate every request, then concatenate them into one batch per latent size (H, W)."""
    if not isinstance(requests, (list, tuple)):
        raise ValueError(f"value requests must be a list of dicts, got {type(requests).__name__}")
    parsed = [parse_request(r, k, model) for k, r in enumerate(requests)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (z, _, _) in enumerate(parsed):
        groups.setdefault(tuple(z.shape[1:]), []).append(k)
    batches = []
    for index in groups.values():
        part = [parsed[k] for k in index]
        sizes = [len(z) for z, _, _ in part]
        has = [p is not None for _, _, p in part]
        prompts = [q for (z, _, p) in part for q in (p if p is not None else [""] * len(z))] if any(has) else None
        batches.append(Batch(torch.cat([z for z, _, _ in part]), torch.cat([t for _, t, _ in part]), prompts, sizes,
                             index))
    return batches


def split(x: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Per-request pieces of a batched result (copies, so a piece does not pin the whole batch)."""
    return [p.clone() for p in torch.split(x, list(sizes))]
