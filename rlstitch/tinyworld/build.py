"""Train the tiny world from scratch: VAE -> CLIP-style reward -> aesthetic head -> SD3 and FLUX generators.

The generators are conditioned on the finished CLIP's text tower, saved apart as `text_encoder/` (as SD3/FLUX
keep their own frozen text encoders), so a later change of the reward never silently changes the generators.

    python -m rlstitch.tinyworld.build [--out DIR] [--scale 1.0] [--only sd3,flux]

Writes safetensors weights + config.json per model under DIR (default: the package's weights folder)
and a training.json per model (the model card comes from `python -m rlstitch.tinyworld.evaluate`). --scale multiplies every step count (tests use a tiny scale).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rlstitch.data import scenes as data
from rlstitch.io import atomic_save, atomic_write_text
from rlstitch.models.registry import TINY_DIR, load_codec, load_reward, load_text_encoder, save_tiny_clip
from rlstitch.models.tokenizer import WordTokenizer
from rlstitch.tinyworld import models as tm


@dataclass
class BuildConfig:
    """Every knob of the tiny-world build (steps are multiplied by `scale`)."""

    out: str = str(TINY_DIR)
    scale: float = 1.0
    seed: int = 0
    train_images: int = 24000  # cached training set (images are procedural, so this is only a cache size)
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    decoder_steps: int = 600  # decoder-only refinement with the encoder frozen (latents unchanged)
    decoder_lr: float = 3e-4
    clip_steps: int = 700
    clip_batch: int = 96
    clip_lr: float = 1e-3
    recon_mix: float = 0.5  # share of VAE reconstructions in CLIP training, so it scores decoded images fairly
    clip_image_steps: int = 1200  # image-tower refinement against the frozen text tower
    clip_image_batch: int = 128
    clip_image_lr: float = 5e-4
    clip_joint_steps: int = 800  # both towers against every caption: separates captions the text tower merged
    clip_joint_lr: float = 5e-4
    aesthetic_aux: float = 1.0  # weight of the auxiliary aesthetic regression on the image embedding
    aesthetic_steps: int = 1500
    gen_steps: int = 1200
    gen_batch: int = 48
    gen_lr: float = 1e-3
    cfg_dropout: float = 0.1
    threads: int = 2


STAGES = ("vae", "vae_decoder", "clip", "clip_image", "clip_joint", "aesthetic", "sd3", "flux")


def steps(cfg: BuildConfig, n: int) -> int:
    """A step count under the build's scale (at least 2)."""
    return max(2, int(n * cfg.scale))


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in opt.param_groups:
        g["lr"] = lr


def vocabulary() -> list[str]:
    """Every word the captions use, in a fixed order."""
    tok = WordTokenizer([])
    words = {w for i in range(4000) for w in tok.split(data.sample(i, "train").caption)}
    return sorted(words)


def save_pretrained(model, folder: Path) -> None:
    """diffusers save_pretrained (safetensors) into a temporary sibling folder, then each file renamed into
    `folder`, so an interrupted save never leaves half a weights file over the previous one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        folder.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Cache:
    """The cached training set: images as [-1, 1] tensors, captions, aesthetic labels."""

    def __init__(self, n: int, seed: int):
        b = data.batch(range(n), "train", seed)
        self.images = data.to_tensor(b["images"])
        self.captions = list(b["captions"])
        self.aesthetic = torch.as_tensor(b["aesthetic"], dtype=torch.float32)

    def draw(self, g: torch.Generator, size: int) -> torch.Tensor:
        """Random indices into the cache."""
        return torch.randint(0, len(self.captions), (size,), generator=g)


def train_vae(cfg: BuildConfig, cache: Cache, out: Path) -> dict:
    """AutoencoderKL with MSE + small KL; sets scaling/shift factors so latents have unit variance."""
    vae = tm.build("vae", seed=cfg.seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    total = steps(cfg, cfg.vae_steps)
    for step in (bar := tqdm(range(total), desc="vae")):
        set_lr(opt, lr_at(step, total, cfg.vae_lr))
        x = cache.images[cache.draw(g, cfg.vae_batch)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(cache.images[k : k + 256]).latent_dist.mean for k in range(0, min(2048, len(cache.captions)), 256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    save_pretrained(vae, out / "vae")
    return {"steps": total, "shift_factor": float(z.mean()), "scaling_factor": float(1.0 / z.std())}


def refine_decoder(cfg: BuildConfig, cache: Cache, out: Path) -> dict:
    """Train the decoder alone on the frozen encoder's latents: sharper images, the same latent space."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    total = steps(cfg, cfg.decoder_steps)
    for step in (bar := tqdm(range(total), desc="vae decoder")):
        set_lr(opt, lr_at(step, total, cfg.decoder_lr, warmup=20))
        x = cache.images[cache.draw(g, cfg.vae_batch)]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean  # what the codec feeds the generators
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    save_pretrained(vae.eval(), out / "vae")
    return {"steps": total}


def reconstruct(codec, images: torch.Tensor) -> torch.Tensor:
    """Decode(encode(x)) in chunks, no gradients."""
    with torch.no_grad():
        return torch.cat([codec.decode(codec.encode(images[k : k + 512])).clamp(-1, 1) for k in range(0, len(images), 512)])


def train_clip(cfg: BuildConfig, cache: Cache, recon: torch.Tensor, words: list[str], out: Path) -> dict:
    """Contrastive CLIP on clean images mixed with VAE reconstructions."""
    from rlstitch.models.reward import ClipReward

    ccfg = tm.clip_config(words)
    clip = tm.build("clip", words, seed=cfg.seed).train()
    tok = WordTokenizer(words, ccfg["text_cfg"]["context_length"])
    reward = ClipReward(clip, tok, mean=ccfg["mean"], std=ccfg["std"])
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    total = steps(cfg, cfg.clip_steps)
    for step in (bar := tqdm(range(total), desc="clip")):
        set_lr(opt, lr_at(step, total, cfg.clip_lr))
        idx = cache.draw(g, cfg.clip_batch)
        use_rec = torch.rand(len(idx), generator=g) < cfg.recon_mix
        x = torch.where(use_rec[:, None, None, None], recon[idx], cache.images[idx])
        caps = [cache.captions[i] for i in idx.tolist()]
        img = F.normalize(reward.embed_image(x), dim=-1)
        txt = F.normalize(clip.encode_text(tok(caps)), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T
        # Captions repeat inside a batch: every pair with the same caption counts as a positive.
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    save_tiny_clip(clip.eval(), ccfg, out / "clip")
    return {"steps": total}


def refine_clip_image(cfg: BuildConfig, cache: Cache, recon: torch.Tensor, out: Path) -> dict:
    """Train the image tower further against the FROZEN text tower of the joint CLIP stage."""
    return refine_clip(cfg, cache, recon, out, train_text=False)


def refine_clip_joint(cfg: BuildConfig, cache: Cache, recon: torch.Tensor, out: Path) -> dict:
    """Train both towers against every caption: after the in-batch stage, captions that differ in one shape
    sat at text-embedding cosine ~0.999, which capped image->text retrieval and starved the generators."""
    return refine_clip(cfg, cache, recon, out, train_text=True)


def refine_clip(cfg: BuildConfig, cache: Cache, recon: torch.Tensor, out: Path, train_text: bool) -> dict:
    """Image embeddings classified against EVERY training caption, with an auxiliary aesthetic target.

    Captions never mention background, symmetry or noise; the auxiliary regression of the aesthetic label from
    the normalised embedding stands in for the style knowledge a web-scale CLIP carries.
    """
    reward = load_reward("tiny-clip", path=str(out / "clip"))
    clip = reward.clip
    (clip if train_text else clip.visual).requires_grad_(True)
    clip.logit_scale.requires_grad_(True)
    uniq = sorted(set(cache.captions))

    def caption_embeddings() -> torch.Tensor:
        return F.normalize(torch.cat([reward._text_tower(uniq[k : k + 512])[1] for k in range(0, len(uniq), 512)]), dim=-1)

    if not train_text:
        with torch.no_grad():
            txt_all = caption_embeddings()
    row = {c: k for k, c in enumerate(uniq)}
    label = (cache.aesthetic - cache.aesthetic.mean()) / cache.aesthetic.std()
    aux = torch.nn.Linear(clip.text_projection.shape[1], 1)
    params = [p for p in clip.parameters() if p.requires_grad] + [*aux.parameters()]
    total, lr = (steps(cfg, cfg.clip_joint_steps), cfg.clip_joint_lr) if train_text else (steps(cfg, cfg.clip_image_steps), cfg.clip_image_lr)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(cfg.seed + (7 if train_text else 6))
    reward.train()
    for step in (bar := tqdm(range(total), desc="clip joint" if train_text else "clip image tower")):
        set_lr(opt, lr_at(step, total, lr))
        idx = torch.randint(0, len(recon), (cfg.clip_image_batch,), generator=g)
        use_rec = torch.rand(len(idx), generator=g) < cfg.recon_mix
        x = torch.where(use_rec[:, None, None, None], recon[idx], cache.images[idx])
        rows = torch.tensor([row[cache.captions[i]] for i in idx.tolist()])
        img = F.normalize(reward.embed_image(x), dim=-1)
        txt = caption_embeddings() if train_text else txt_all
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T  # against every caption
        loss = F.cross_entropy(logits, rows) + cfg.aesthetic_aux * F.mse_loss(aux(img).squeeze(-1), label[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    ccfg = json.loads((out / "clip" / "config.json").read_text())
    save_tiny_clip(clip.eval().requires_grad_(False), ccfg, out / "clip")
    return {"steps": total}


def export_text_encoder(out: Path) -> None:
    """Freeze the finished CLIP's text tower as the generators' text encoder (text weights only)."""
    reward = load_reward("tiny-clip", path=str(out / "clip"))
    save_tiny_clip(reward.clip, json.loads((out / "clip" / "config.json").read_text()), out / "text_encoder", text_only=True)


def train_aesthetic(cfg: BuildConfig, cache: Cache, out: Path) -> dict:
    """The aesthetic MLP on normalised tiny-CLIP embeddings of clean images, regressing the label."""
    from rlstitch.models.reward import AestheticMLP

    reward = load_reward("tiny-clip", path=str(out / "clip"))
    with torch.no_grad():
        emb = torch.cat([reward.embed_image(cache.images[k : k + 512]) for k in range(0, len(cache.captions), 512)])
    head = AestheticMLP(emb.shape[1], tm.aesthetic_hidden()).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    total = steps(cfg, cfg.aesthetic_steps)
    for step in tqdm(range(total), desc="aesthetic"):
        set_lr(opt, lr_at(step, total, 1e-3))
        idx = cache.draw(g, 256)
        loss = F.mse_loss(head(emb[idx]), cache.aesthetic[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    d = out / "aesthetic"
    d.mkdir(parents=True, exist_ok=True)
    atomic_save(head.state_dict(), d / "model.safetensors")
    atomic_write_text(d / "config.json", json.dumps({"clip": "tiny-clip", "hidden": tm.aesthetic_hidden()}))
    return {"steps": total}


def encode_captions(out: Path, captions: list[str]) -> tuple[dict, object]:
    """Text-encoder conditions for every distinct caption (and the empty prompt)."""
    reward = load_text_encoder("tiny-text", path=str(out / "text_encoder"))
    uniq = sorted(set(captions)) + [""]
    conds = {}
    for k in range(0, len(uniq), 512):
        c = reward.text_condition(uniq[k : k + 512])
        for n, cap in enumerate(uniq[k : k + 512]):
            conds[cap] = (c.tokens[n], c.pooled[n])
    return conds, reward


def train_generator(kind: str, cfg: BuildConfig, cache: Cache, latents: torch.Tensor, conds: dict, out: Path) -> dict:
    """Rectified flow on the VAE latents, logit-normal t, text conditioning with CFG dropout, EMA weights."""
    model = tm.build(kind, seed=cfg.seed + 3).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.gen_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    total = steps(cfg, cfg.gen_steps)
    from rlstitch.models.backbone import FluxBackbone, SD3Backbone
    from rlstitch.models.condition import Condition

    bb = SD3Backbone(model) if kind == "sd3" else FluxBackbone(model, pack=1)
    for step in (bar := tqdm(range(total), desc=kind)):
        set_lr(opt, lr_at(step, total, cfg.gen_lr, warmup=100))
        idx = cache.draw(g, cfg.gen_batch)
        drop = torch.rand(len(idx), generator=g) < cfg.cfg_dropout
        caps = ["" if d else cache.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        cond = Condition(torch.stack([conds[c][0] for c in caps]), torch.stack([conds[c][1] for c in caps]))
        z0 = latents[idx]
        t = torch.sigmoid(torch.randn(len(idx), generator=g))
        eps = torch.randn(z0.shape, generator=g)
        zt = (1 - t.view(-1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(bb.velocity(zt, t, cond), eps - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.load_state_dict(ema)
    # Stored in float16 (loaded back as float32) to keep the committed tiny world under 40 MB.
    save_pretrained(model.eval().to(torch.float16), out / kind)
    return {"steps": total}


def build(cfg: BuildConfig, only: set[str] | None = None) -> dict:
    """Run every stage (or those in `only`); each writes its weights and a training.json beside them."""
    want = only or set(STAGES)
    if unknown := want - set(STAGES):
        raise ValueError(f"unknown build stage(s) {sorted(unknown)}; known: {', '.join(STAGES)}")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = {}
    n = max(256, steps(cfg, cfg.train_images))
    t0 = time.time()
    cache = Cache(n, cfg.seed)
    words = vocabulary()

    def stage(name, fn, *args):
        if name in want:
            s = time.time()
            info = {**fn(*args), "seconds": round(time.time() - s, 1), "config": asdict(cfg)}
            # One file per model, so stages may run in parallel processes without racing on a shared card.
            (out / name).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / name / "training.json", json.dumps(info, indent=2))
            trained[name] = info

    stage("vae", train_vae, cfg, cache, out)
    stage("vae_decoder", refine_decoder, cfg, cache, out)
    codec = load_codec("tiny-vae", path=str(out / "vae"))
    if {"clip", "clip_image", "clip_joint"} & want:
        recon = reconstruct(codec, cache.images)
        stage("clip", train_clip, cfg, cache, recon, words, out)
        stage("clip_image", refine_clip_image, cfg, cache, recon, out)
        stage("clip_joint", refine_clip_joint, cfg, cache, recon, out)
        export_text_encoder(out)
    stage("aesthetic", train_aesthetic, cfg, cache, out)
    if {"sd3", "flux"} & want:
        conds, _ = encode_captions(out, cache.captions)
        with torch.no_grad():
            latents = torch.cat([codec.encode(cache.images[k : k + 512]) for k in range(0, n, 512)])
        for kind in ("sd3", "flux"):
            stage(kind, train_generator, kind, cfg, cache, latents, conds, out)
    print(f"built {sorted(trained)} in {time.time() - t0:.0f} s")
    return trained


def main(argv=None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(TINY_DIR))
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = p.parse_args(argv)
    cfg = BuildConfig(out=a.out, scale=a.scale, threads=a.threads)
    trained = build(cfg, set(a.only.split(",")) - {""} or None)
    print(json.dumps({k: {"steps": v["steps"], "seconds": v["seconds"]} for k, v in trained.items()}, indent=2))


if __name__ == "__main__":
    main()
