"""Evaluate the tiny world on held-out data and write its model card.

    python -m rlstitch.tinyworld.evaluate --json /tmp/tw.json [--grid PNG] [--card]

Figures: vae_psnr_db; clip_i2t_r1 / clip_t2i_r1 (clean val images vs their captions, gallery of 500 pairs);
aesthetic_srcc; per generator (sd3, flux): gen_clip_r1 (images sampled with 20 steps from 100 held-out
captions, retrieved to their own caption among those 100 by the tiny CLIP) and gen_clip_score_ratio (mean
CLIP score of generated images over that of the real test images with the same captions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rlstitch.data import scenes as data
from rlstitch.eval.metrics import recall_at_1, spearman, unique_captions
from rlstitch.io import atomic_write_text
from rlstitch.models.registry import load_backbone, load_codec, load_reward, tiny_root
from rlstitch.sampling.flow import FlowSampler
from rlstitch.sampling.generate import generate

GALLERY = 500
GEN_CAPTIONS = 100
# Every model folder the card lists, with its one-line description (also the order of the card's table).
CARD_MODELS = (
    ("vae", "AutoencoderKL"),
    ("vae_decoder", "decoder-only refinement (same file)"),
    ("clip", "open_clip CLIP (ViT 6x64, text 4x64)"),
    ("clip_image", "image tower vs frozen text + aesthetic auxiliary (same file)"),
    ("clip_joint", "both towers vs every caption + aesthetic auxiliary (same file)"),
    ("text_encoder", "the finished CLIP's text tower, frozen: conditions the generators"),
    ("aesthetic", "LAION-style MLP"),
    ("sd3", "SD3Transformer2DModel (8 blocks)"),
    ("flux", "FluxTransformer2DModel (4+4 blocks)"),
)
CFG_SCALE = 6.0  # chosen on 100 val captions over {3, 4, 5, 6, 7} (best mean gen_clip_r1 of both generators)


def embed_images(reward, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Reward image embeddings in chunks, no gradients."""
    with torch.no_grad():
        return torch.cat([reward.embed_image(images[k : k + chunk]) for k in range(0, len(images), chunk)])


def vae_psnr(codec, images: torch.Tensor) -> float:
    """Mean PSNR (dB, pixel range [0, 1]) of decode(encode(x))."""
    with torch.no_grad():
        rec = torch.cat([codec.decode(codec.encode(images[k : k + 256])).clamp(-1, 1) for k in range(0, len(images), 256)])
    mse = ((rec - images) / 2).square().flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def clip_retrieval(reward) -> dict:
    """Recall@1 of clean val images against their captions."""
    b = data.batch(range(GALLERY), "val")
    gallery = unique_captions(b["captions"])
    r = recall_at_1(embed_images(reward, data.to_tensor(b["images"])), b["captions"],
                    reward.embed_text(gallery), gallery)
    return {"clip_i2t_r1": r["i2t"], "clip_t2i_r1": r["t2i"], "gallery_pairs": GALLERY, "gallery_captions": len(gallery)}


def aesthetic_srcc(reward, n: int = 1000) -> float:
    """Spearman correlation of the aesthetic predictor with the image-defined label on val images."""
    b = data.batch(range(n), "val")
    with torch.no_grad():
        scores = reward.score_embedding(embed_images(reward, data.to_tensor(b["images"])), None)
    return spearman(scores.tolist(), b["aesthetic"].tolist())


def held_out_prompts(n: int = GEN_CAPTIONS) -> tuple[list[str], torch.Tensor]:
    """n distinct test-split captions and one real image for each."""
    caps, imgs, k = [], [], 0
    while len(caps) < n:
        s = data.sample(k, "test")
        if s.caption not in caps:
            caps.append(s.caption)
            imgs.append(s.image)
        k += 1
    import numpy as np

    return caps, data.to_tensor(np.stack(imgs))


def generator_quality(kind: str, reward, codec, prompts, real: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """gen_clip_r1 and gen_clip_score_ratio of one generator; also returns its samples."""
    backbone = load_backbone(f"tiny-{kind}")
    images = torch.cat([generate(backbone, codec, prompts[k : k + 50], sampler=FlowSampler(steps=20),
                                 cfg_scale=CFG_SCALE, seeds=range(k, k + 50)) for k in range(0, len(prompts), 50)])
    emb = embed_images(reward, images)
    r = recall_at_1(emb, prompts, reward.embed_text(prompts), prompts)
    with torch.no_grad():
        gen_score = reward.score_embedding(emb, prompts).mean()
        real_score = reward.score_embedding(embed_images(reward, real), prompts).mean()
    return {"gen_clip_r1": r["i2t"], "gen_clip_score_ratio": float(gen_score / real_score)}, images


def flops_per_call() -> dict:
    """FLOPs of one sample through the generators, the decoder and the reward image tower."""
    out = {}
    z = torch.randn(1, 4, 8, 8)
    for kind in ("sd3", "flux"):
        bb = load_backbone(f"tiny-{kind}")
        cond = bb.null_condition()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            bb.velocity(z, 0.5, cond)
        out[f"generator_{kind}"] = fc.get_total_flops()
    codec, reward = load_codec("tiny-vae"), load_reward("tiny-clip")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        codec.decode(z)
    out["vae_decoder"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        reward.embed_image(torch.zeros(1, 3, 32, 32))
    out["reward_image_tower"] = fc.get_total_flops()
    return out


def save_grid(images: dict[str, torch.Tensor], prompts: list[str], path: Path, n: int = 8) -> None:
    """PNG grid: a row of real test images and one row per generator, captions underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(images)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.9 * len(rows)))
    for r, name in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(data.from_tensor(images[name][c]))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == len(rows) - 1:
                ax.set_xlabel(prompts[c], fontsize=5, wrap=True)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def evaluate(grid: Path | None = None) -> dict:
    """Every figure of the tiny world, in one run."""
    t0 = time.time()
    codec, reward, aesthetic = load_codec("tiny-vae"), load_reward("tiny-clip"), load_reward("tiny-aesthetic")
    val = data.to_tensor(data.batch(range(512), "val")["images"])
    res = {"vae_psnr_db": vae_psnr(codec, val), **clip_retrieval(reward), "aesthetic_srcc": aesthetic_srcc(aesthetic)}
    prompts, real = held_out_prompts()
    samples = {"real": real}
    for kind in ("sd3", "flux"):
        res[kind], samples[kind] = generator_quality(kind, reward, codec, prompts, real)
    res["gen_prompts"], res["gen_steps"], res["gen_cfg_scale"] = GEN_CAPTIONS, 20, CFG_SCALE
    res["seconds"] = round(time.time() - t0, 1)
    if grid:
        save_grid(samples, prompts, grid)
    return res


def write_card(res: dict, root: Path) -> None:
    """card.json and CARD.md beside the weights: sizes, FLOPs, training time, quality figures."""
    sizes, training = {}, {}
    for name, _ in CARD_MODELS:
        sizes[name] = sum(f.stat().st_size for f in (root / name).glob("*.safetensors"))
        tj = root / name / "training.json"
        if tj.exists():
            info = json.loads(tj.read_text())
            training[name] = {"steps": info["steps"], "seconds": info["seconds"]}
    card = {"image_size": 32, "latent": [4, 8, 8], "token_grid": [8, 8], "reward_patch_grid": [8, 8],
            "file_bytes": sizes, "training": training, "flops_per_call": flops_per_call(), "quality": res}
    atomic_write_text(root / "card.json", json.dumps(card, indent=2))
    f = card["flops_per_call"]
    md = [
        "# Tiny world model card", "",
        "32x32 RGB procedural shapes (1-3 coloured circles/squares/triangles with captions; an image-defined",
        "aesthetic label). 32 px keeps every model trainable on 2 CPU cores while an 8x8x4 latent still gives",
        "the generators an 8x8 token grid equal to the reward's 8x8 patch grid (patch 4).", "",
        "| model | class | file MB | train steps | train s |", "|---|---|---|---|---|",
        *[f"| {n} | {c} | {sizes[n] / 1e6:.2f} | {training.get(n, {}).get('steps', '-')} | "
          f"{training.get(n, {}).get('seconds', '-')} |"
          for n, c in CARD_MODELS], "",
        f"FLOPs per sample and call: SD3 generator {f['generator_sd3'] / 1e6:.1f} M, FLUX generator "
        f"{f['generator_flux'] / 1e6:.1f} M, VAE decoder {f['vae_decoder'] / 1e6:.1f} M, reward image tower "
        f"{f['reward_image_tower'] / 1e6:.1f} M (generator / reward = {f['generator_sd3'] / f['reward_image_tower']:.1f}x).", "",
        "Held-out quality (`python -m rlstitch.tinyworld.evaluate`):", "",
        f"- VAE PSNR {res['vae_psnr_db']:.2f} dB; CLIP I->T R@1 {res['clip_i2t_r1']:.3f}, T->I {res['clip_t2i_r1']:.3f} "
        f"({res['gallery_pairs']} pairs, {res['gallery_captions']} distinct captions); aesthetic SRCC {res['aesthetic_srcc']:.3f}",
        *[f"- {k}: gen_clip_r1 {res[k]['gen_clip_r1']:.3f}, gen_clip_score_ratio {res[k]['gen_clip_score_ratio']:.3f} "
          f"({res['gen_prompts']} held-out captions, {res['gen_steps']} steps, CFG {res['gen_cfg_scale']})" for k in ("sd3", "flux")],
    ]
    atomic_write_text(root / "CARD.md", "\n".join(md) + "\n")


def main(argv=None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description="Evaluate the tiny world on held-out data")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--grid", default=None, help="PNG grid of samples (default: beside the JSON)")
    p.add_argument("--card", action="store_true", help="also write card.json / CARD.md beside the weights")
    a = p.parse_args(argv)
    grid = Path(a.grid) if a.grid else Path(a.json).with_suffix(".png")
    res = evaluate(grid)
    atomic_write_text(a.json, json.dumps(res, indent=2))
    if a.card:
        write_card(res, tiny_root())
    flat = {k: v for k, v in res.items() if not isinstance(v, dict)}
    flat |= {f"{g}.{k}": v for g in ("sd3", "flux") for k, v in res[g].items()}
    for k, v in flat.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    print(f"samples grid: {grid}")


if __name__ == "__main__":
    main()
