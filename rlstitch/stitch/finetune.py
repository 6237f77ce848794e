"""Stage 2: distil the frozen reward model (on clean images) into a noisy-latent student (SPEC §1).

Students: StitchVM (stitch lr x5 + reward tail), the VAE-stitch and the from-scratch NoisyReward baselines.
Each exposes `trainable_modules()` and `embed(z_t, t, return_tokens=True)`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from rlstitch.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlstitch.config import PRECISIONS, use_bf16
from rlstitch.models.device import model_device
from rlstitch.sampling.flow import forward_noise


@dataclass
class FinetuneConfig:
    """Stage-2 knobs (paper: AdamW lr 1e-5, wd 0, 100 warm-up steps, batch 128; tiny world: higher lr).

    The tiny-world lr and lambda_tok were chosen by 600-step probes on tiny-sd3 x tiny-clip; the sweep and its
    R@1 figures are in README ("Finetune knobs").
    """

    steps: int = 3000  # optimizer steps
    batch: int = 64  # images per step
    lr: float = 3e-3  # reward-tail learning rate (the stitch's is stitch_lr_mult times this)
    stitch_lr_mult: float = 5.0  # the stitch learns 5x faster (SPEC)
    warmup: int = 100  # linear warm-up steps, then cosine to 10%
    weight_decay: float = 0.0
    lambda_tok: float = 0.1  # weight of the per-token term (CLIP-type rewards; the embedding term is what R@1 uses)
    train_images: int = 16384  # distinct training images (teacher targets are cached once)
    val_images: int = 256  # held-out images for the logged validation loss
    eval_every: int = 250  # steps between validation losses
    ckpt_every: int = 500  # steps between resumable checkpoints (with a ckpt dir)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on a GPU, fp32 on the CPU; fp32 | bf16 (autocast: fp32 weights and losses)

    def validate(self) -> None:
        """Reject values that cannot work."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"finetune.precision must be auto, fp32 or bf16, got {self.precision!r}")
        for k in ("steps", "batch", "train_images", "val_images", "eval_every", "ckpt_every"):
            if getattr(self, k) <= 0:
                raise ValueError(f"finetune.{k} must be positive, got {getattr(self, k)}")
        if self.lr <= 0 or self.stitch_lr_mult <= 0:
            raise ValueError("finetune.lr and finetune.stitch_lr_mult must be positive")


@dataclass
class Targets:
    """Cached teacher outputs on clean images: latents z0, embeddings, last-block tokens and scores."""

    z0: Tensor
    emb: Tensor
    tokens: Tensor
    score: Tensor | None = None


@torch.no_grad()
def teacher_targets(reward, codec, images: Tensor, chunk: int = 256) -> Targets:
    """Encode images and run the frozen reward on them (the distillation targets, on the reward's device)."""
    z0, emb, tok, score = [], [], [], []
    device = model_device(reward)
    for k in range(0, len(images), chunk):
        x = images[k : k + chunk].to(device)
        z0.append(codec.encode(x))
        e, h = reward.tail(reward.prefix(x, 0), 0, return_tokens=True)
        emb.append(e.float())
        tok.append(h.float())
        if reward.kind == "aesthetic":
            score.append(reward.score_embedding(e, None).float())
    return Targets(torch.cat(z0), torch.cat(emb), torch.cat(tok), torch.cat(score) if score else None)


def distill_loss(reward, emb: Tensor, tok: Tensor, tgt: Targets, idx: Tensor, lambda_tok: float) -> Tensor:
    """CLIP-type: |e~_SV - e~_RM|^2 + lambda_tok |h_SV - h_RM|^2; aesthetic: SmoothL1 on tokens, emb, score."""
    if reward.kind == "aesthetic":
        score = reward.score_embedding(emb, None).float()
        return (F.smooth_l1_loss(tok.float(), tgt.tokens[idx]) + F.smooth_l1_loss(emb.float(), tgt.emb[idx])
                + F.smooth_l1_loss(score, tgt.score[idx]))
    e_sv, e_rm = F.normalize(emb.float(), dim=-1), F.normalize(tgt.emb[idx], dim=-1)
    return (e_sv - e_rm).square().sum(-1).mean() + lambda_tok * (tok.float() - tgt.tokens[idx]).square().mean()


def autocast(cfg: FinetuneConfig, device: torch.device):
    """The forward passes' precision: bf16 autocast (weights, optimizer and losses stay fp32) or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.precision, device.type == "cuda"))


def sample_t(n: int, g: torch.Generator) -> Tensor:
    """Centre-biased times: logit-normal(0, 1)."""
    return torch.sigmoid(torch.randn(n, generator=g))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def set_trainable(student, trainable: bool) -> None:
    """(Un)freeze every trained module. Value models are built frozen and handed back frozen, so a backward
    through a served V (DRaFT, DPS) computes no weight gradients."""
    for m in student.trainable_modules().values():
        m.requires_grad_(trainable)


def make_optimizer(student, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over every trained module (unfrozen here) with the stitch at lr x stitch_lr_mult."""
    set_trainable(student, True)
    groups = [
        {"params": list(m.parameters()), "lr": cfg.lr * (cfg.stitch_lr_mult if name == "stitch" else 1.0),
         "base_lr": cfg.lr * (cfg.stitch_lr_mult if name == "stitch" else 1.0)}
        for name, m in student.trainable_modules().items()
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(opt: torch.optim.Optimizer, step: int, cfg: FinetuneConfig) -> None:
    """Each group's base_lr times the warm-up / cosine factor of this step."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, cfg.steps, cfg.warmup)


def batch_loss(student, reward, train: Targets, cfg: FinetuneConfig, g: torch.Generator,
               batch: int) -> Tensor:
    """Distillation loss of one random batch (indices, times and noise all drawn from g)."""
    idx = torch.randint(0, len(train.z0), (batch,), generator=g)
    t = sample_t(batch, g)
    z0 = train.z0[idx]
    zt = forward_noise(z0, t.to(z0.device), torch.randn(z0.shape, generator=g).to(z0.device))
    emb, tok = student.embed(zt, t.to(z0.device), return_tokens=True)
    return distill_loss(reward, emb, tok, train, idx, cfg.lambda_tok)


@torch.no_grad()
def validation_loss(student, reward, val: Targets, cfg: FinetuneConfig) -> float:
    """Distillation loss on held-out images at fixed times 0.1..0.9 and fixed noise."""
    g = torch.Generator().manual_seed(12345)
    n = len(val.z0)
    t = torch.linspace(0.1, 0.9, n, device=val.z0.device)
    zt = forward_noise(val.z0, t, torch.randn(val.z0.shape, generator=g).to(val.z0.device))
    emb, tok = student.embed(zt, t, return_tokens=True)
    return float(distill_loss(reward, emb, tok, val, torch.arange(n), cfg.lambda_tok))


# Knobs a resumed run must share with its checkpoint (steps, eval/ckpt cadence and precision may change).
RESUME_KNOBS = ("seed", "batch", "train_images", "lr", "stitch_lr_mult", "warmup", "weight_decay", "lambda_tok")


def run_identity(student, cfg: FinetuneConfig) -> dict:
    """What makes a checkpoint this run's: the student (kind and cut) and the knobs that shape every update."""
    return {"student": type(student).__name__, "i": getattr(student, "i", None), "j": getattr(student, "j", None),
            **{k: getattr(cfg, k) for k in RESUME_KNOBS}}


def check_resumable(ckpt: Path, run: dict) -> None:
    """A checkpoint of another student or other knobs (a stale folder) must not be continued silently."""
    try:
        saved = json.loads((ckpt / "info.json").read_text()).get("run")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    if saved is None:  # written before checkpoints recorded their run: nothing to compare
        return
    diff = [f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in run.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"{ckpt} belongs to another run ({'; '.join(diff)}): use another checkpoint folder "
                         "or remove this one")


def finetune(student, reward, train: Targets, val: Targets, cfg: FinetuneConfig, ckpt_dir: str | Path | None = None,
             log: Callable[[dict], None] | None = None, desc: str = "finetune") -> list[dict]:
    """Train the student for cfg.steps; resumes from the latest checkpoint in ckpt_dir. Returns the history."""
    opt = make_optimizer(student, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    modules = student.trainable_modules()
    start, history = 0, []
    run = run_identity(student, cfg)
    if ckpt_dir and (last := latest_checkpoint(ckpt_dir)):
        check_resumable(last, run)
        info = load_checkpoint(last, modules, opt, {"data": g})
        start, history = info["step"], info["history"]
    student.train()
    amp = autocast(cfg, train.z0.device)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    for step in bar:
        set_lr(opt, step, cfg)
        with amp:
            loss = batch_loss(student, reward, train, cfg, g, cfg.batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            student.eval()
            with amp:
                val_loss = validation_loss(student, reward, val, cfg)
            rec = {"step": done, "train_loss": float(loss.detach()), "val_loss": val_loss,
                   "seconds": round(time.time() - t0, 1)}
            student.train()
            history.append(rec)
            bar.set_postfix(loss=f"{rec['train_loss']:.4f}", val=f"{rec['val_loss']:.4f}")
            if log:
                log(rec)
        if ckpt_dir and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_checkpoint(Path(ckpt_dir) / f"step-{done}", modules, opt, {"data": g}, step=done, history=history,
                            run=run)
    student.eval()
    set_trainable(student, False)
    return history
