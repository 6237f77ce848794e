"""Checkpoints without pickle: module weights, optimizer state and RNG states as safetensors + JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rlstitch.io import atomic_save, atomic_write_text


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flatten an optimizer's state into tensors plus JSON-able scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars["state"].setdefault(str(pid), {})[k] = v
    return tensors, scalars


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, scalars: dict) -> None:
    """Inverse of optimizer_tensors."""
    state: dict = {}
    for name, v in tensors.items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in scalars["state"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def save_checkpoint(path: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
                    generators: dict[str, torch.Generator] | None = None, **info) -> Path:
    """Write a checkpoint folder atomically (a temp folder renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}
    scalars: dict = {}
    if optimizer is not None:
        opt_t, scalars = optimizer_tensors(optimizer)
        tensors |= opt_t
    for name, g in (generators or {}).items():
        tensors[f"rng.{name}"] = g.get_state()
    atomic_save(tensors, tmp / "state.safetensors")
    atomic_write_text(tmp / "info.json", json.dumps({"optimizer": scalars, **info}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_checkpoint(path: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore what save_checkpoint wrote (in place); returns the info dict."""
    path = Path(path)
    try:
        tensors = load_file(path / "state.safetensors")
        info = json.loads((path / "info.json").read_text())
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    for m, mod in modules.items():
        mod.load_state_dict({k[len(m) + 1:]: v for k, v in tensors.items() if k.startswith(m + ".")})
    if optimizer is not None:
        restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("opt.")}, info["optimizer"])
    for name, g in (generators or {}).items():
        g.set_state(tensors[f"rng.{name}"])
    return info


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The step-N subfolder with the largest N, if any."""
    found = [p for p in Path(folder).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None
