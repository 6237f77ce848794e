"""Driver-side bookkeeping of a training run, Ray-free: logging (console, progress bar, wandb offline or
online), sample grids, and full checkpoints (learner state of every rank + driver RNG + data position + step).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from rlstitch.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger("rlstitch.train")


class TensorBag(nn.Module):
    """A plain dict of tensors that save_checkpoint / load_checkpoint can treat as a module."""

    def __init__(self, tensors: dict[str, Tensor] | None = None):
        super().__init__()
        self.tensors = dict(tensors or {})

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:  # noqa: D102 - the dict itself
        return dict(self.tensors)

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):  # noqa: D102
        self.tensors = dict(state)


def save_run(folder: str | Path, step: int, learner_states: list[dict], generator: torch.Generator,
             keep: int = 2, extra: dict[str, dict[str, Tensor]] | None = None, **info) -> Path:
    """Write <folder>/step-<step> (atomically) and keep the newest `keep` checkpoints; `extra` holds further named
    tensor dicts (e.g. the weights in-flight rollouts were sampled with), returned by load_run."""
    rank0 = learner_states[0]
    modules = {"policy": TensorBag(rank0["policy"]), "ema": TensorBag(rank0["ema"])}
    if "old" in rank0:
        modules["old"] = TensorBag(rank0["old"])
    for k, st in enumerate(learner_states):
        modules[f"learner{k}"] = TensorBag(st["optimizer"])
    extra = dict(extra or {})
    if set(extra) & set(modules):
        raise ValueError(f"extra tensors {sorted(set(extra) & set(modules))} clash with the learner's")
    modules |= {name: TensorBag(tensors) for name, tensors in extra.items()}
    scalars = [st["optimizer_scalars"] for st in learner_states]
    path = save_checkpoint(Path(folder) / f"step-{step}", modules, None, {"driver": generator},
                           learner_step=int(rank0["step"]), learner_ranks=len(learner_states),
                           optimizer_scalars=scalars, has_old="old" in rank0, extra_tensors=sorted(extra), **info)
    ckpts = sorted((p for p in Path(folder).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                   key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_run(path: str | Path, generator: torch.Generator) -> tuple[list[dict], dict, dict[str, dict[str, Tensor]]]:
    """(per-rank learner states, info, extra tensors) of a checkpoint; restores the driver generator in place."""
    path = Path(path)
    info = json.loads((path / "info.json").read_text())
    n = int(info["learner_ranks"])
    extra = {name: TensorBag() for name in info.get("extra_tensors", [])}
    bags = {name: TensorBag() for name in ["policy", "ema", *(["old"] if info["has_old"] else []),
                                           *[f"learner{k}" for k in range(n)]]}
    info = load_checkpoint(path, bags | extra, None, {"driver": generator})
    states = []
    for k in range(n):
        st = {"optimizer": bags[f"learner{k}"].tensors, "optimizer_scalars": info["optimizer_scalars"][k]}
        if k == 0:
            st |= {"policy": bags["policy"].tensors, "ema": bags["ema"].tensors, "step": info["learner_step"]}
            if info["has_old"]:
                st["old"] = bags["old"].tensors
        states.append(st)
    return states, info, {name: bag.tensors for name, bag in extra.items()}


def find_resume(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under folder, if any."""
    return latest_checkpoint(folder) if Path(folder).is_dir() else None


def image_grid(images: Tensor, nrow: int = 8):
    """[-1, 1] images [N, 3, H, W] -> one uint8 HxWx3 numpy grid."""
    from torchvision.utils import make_grid

    g = make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1)
    return (g.permute(1, 2, 0).numpy() * 255).round().astype("uint8")


def save_png(img, path: Path) -> None:
    """An HxWx3 uint8 array as a PNG file, written atomically."""
    from PIL import Image

    from rlstitch.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"), ".png")


class RunLogger:
    """Console + tqdm progress bar + wandb (offline unless WANDB_MODE says otherwise) + a metrics.jsonl file."""

    def __init__(self, out: str | Path, config: dict, total: int, *, use_wandb: bool = True, project: str = "rlstitch",
                 name: str | None = None, resume_id: str | None = None, progress: bool = True, start: int = 0):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "metrics.jsonl", "a")
        self.t0 = time.perf_counter()
        self.wandb = None
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=project, name=name, dir=str(self.out), config=config, id=resume_id,
                                    resume="allow" if resume_id else None, reinit="finish_previous")
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="iterations", unit="it", dynamic_ncols=True)

    @property
    def run_id(self) -> str | None:
        """The wandb run id (kept in checkpoints so a resumed run continues the same wandb run)."""
        return self.wandb.id if self.wandb is not None else None

    def elapsed(self) -> float:
        """Seconds since the logger started."""
        return time.perf_counter() - self.t0

    def info(self, msg: str) -> None:
        """A console line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, metrics: dict, step: int, images: dict | None = None) -> None:
        """Scalars to wandb and metrics.jsonl (with step and wall time); optional images {key: (HxWx3 uint8, caption)}
        to wandb and as <out>/samples/<key>-step<step>.png, so a run's pictures need no wandb to be seen."""
        row = {"step": step, "wall_s": round(self.elapsed(), 3), **{k: _num(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, (img, _) in (images or {}).items():
            save_png(img, self.out / "samples" / f"{key.replace('/', '-')}-step{step}.png")
        if self.wandb is not None:
            payload = dict(row)
            if images:
                import wandb

                payload |= {k: wandb.Image(img, caption=cap) for k, (img, cap) in images.items()}
            self.wandb.log(payload, step=step)

    def advance(self, postfix: dict | None = None) -> None:
        """One iteration done."""
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})

    def finish(self, summary: dict) -> None:
        """Final metrics to wandb's summary and summary.json, then close everything."""
        from rlstitch.io import atomic_write_text

        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
        self.file.close()


def _num(v):
    """Tensors and numpy scalars as plain floats for JSON."""
    if isinstance(v, Tensor):
        return float(v.float().mean())
    if hasattr(v, "item"):
        return v.item()
    return v
