"""Build a StitchVM in one process: statistics -> closed-form fit -> (i*, j*) -> finetune -> artifact.

    python -m rlstitch.stitch.build backbone=tiny-sd3 reward=tiny-clip out=DIR [baselines=true] [key=value ...]

DIR receives the finetuned StitchVM artifact, the closed-form-only one (DIR/closed_form), the statistics,
the residual table and heat map, and with baselines=true the VAE-stitch (DIR/vae_stitch, 3x the finetune
steps) and NoisyReward (DIR/noisy_reward) baselines that `python -m rlstitch.eval.fidelity` compares.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlstitch.config import load_config, to_dict
from rlstitch.data.probe import image_batches, load_images
from rlstitch.io import atomic_write_text
from rlstitch.models import registry
from rlstitch.models.registry import BACKBONES, load_backbone, load_codec, load_reward
from rlstitch.stitch import artifact
from rlstitch.stitch.collect import collect_stats
from rlstitch.stitch.finetune import FinetuneConfig, Targets, finetune, teacher_targets
from rlstitch.stitch.fit import plot_residuals, residual_table, select, solve_all
from rlstitch.stitch.layer import StitchLayer
from rlstitch.stitch.noisy import NoisyReward
from rlstitch.stitch.vm import LatentTokens, StitchVM


@dataclass
class StitchBuildConfig:
    """Knobs of a stitch build."""

    backbone: str = "tiny-sd3"  # registry name of the diffusion transformer
    backbone_path: str | None = None  # local weights folder (default: the registry's location)
    reward: str = "tiny-clip"  # registry name of the pixel reward
    reward_path: str | None = None
    out: str = "outputs/stitch/tiny-sd3_tiny-clip"  # artifact folder
    data: str = "tinyworld"  # 'tinyworld' or a folder of Parquet shards (image, caption)
    probe_images: int = 4096  # images whose paired features feed the closed-form fit
    batch: int = 64  # probe batch size
    j_max: int = 4  # reward cut j restricted to early blocks (paper: j <= 4 of 24)
    i_tolerance: float = 0.0  # >0: shallowest DiT cut within (1 + tol) x the best residual (cheaper V)
    ridge: float = 1e-4  # ridge lambda, scaled by tr(Cxx)/d
    seed: int = 0
    threads: int = 0  # torch threads (0: leave as is)
    device: str = "auto"  # auto (cuda when this process sees a GPU) | cpu | cuda; statistics stay float64 on the CPU
    baselines: bool = False  # also build the VAE-stitch and NoisyReward baselines
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        """Start-up checks with the knob to change."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is not one of {sorted(BACKBONES)}")
        if self.probe_images < self.batch or self.batch <= 0:
            raise ValueError(f"probe_images ({self.probe_images}) must be >= batch ({self.batch}) > 0")
        if self.j_max < 0:
            raise ValueError(f"j_max must be >= 0, got {self.j_max}")
        registry.resolve_device(self.device)  # a misspelt device, or cuda without a GPU, fails here
        self.finetune.validate()


def load_models(cfg: StitchBuildConfig, device: torch.device | str = "cpu"):
    """Backbone (with its text encoder: StitchVM runs it under the null condition), reward and codec."""
    backbone = load_backbone(cfg.backbone, cfg.backbone_path, with_text=True, device=device)
    reward = load_reward(cfg.reward, cfg.reward_path, device=device)
    codec = load_codec(BACKBONES[cfg.backbone].vae, device=device)
    return backbone, reward, codec


def probe_seed(cfg: StitchBuildConfig) -> int:
    """Seed of the probe images and their noise (kept apart from the finetune images' seed)."""
    return cfg.seed + 1


def solve_and_select(stats, cfg: StitchBuildConfig, tag: str):
    """Every closed-form fit from (merged) statistics and the selected (i*, j*)."""
    fits = solve_all(stats, cfg.ridge)
    best = select(fits, cfg.j_max, cfg.i_tolerance)
    print(f"[{tag}] chosen (i*, j*) = ({best.i}, {best.j}), relative residual {best.rel_residual:.4f}")
    return fits, best


def stitch_layer(backbone, reward, latent_hw, best, cls_mean) -> StitchLayer:
    """The stitching layer initialised from the selected fit and the mean reward [CLS] entering j*."""
    layer = StitchLayer(backbone.hidden_dim, reward.width, backbone.grid(latent_hw), reward.grid)
    layer.init_from_fit(best.W.float(), best.bias.float(), cls_mean.float())
    return layer


def fit_stitch(backbone, reward, codec, cfg: StitchBuildConfig, latent_hw, tag: str):
    """Statistics over the probe set, every fit, the selected one and its layer."""
    batches = image_batches(cfg.data, cfg.probe_images, cfg.batch, probe_seed(cfg))
    total = -(-cfg.probe_images // cfg.batch)
    stats = collect_stats(backbone, reward, codec, batches, cfg.j_max, latent_hw, total=total)
    fits, best = solve_and_select(stats, cfg, tag)
    layer = stitch_layer(backbone, reward, latent_hw, best, stats.sum_cls[best.j] / stats.n)
    return stats, fits, best, layer


def residual_record(fits) -> dict:
    """Residuals as {"i,j": value} for the manifest."""
    return {f"{i},{j}": round(f.rel_residual, 6) for (i, j), f in sorted(fits.items())}


def write_fit_report(out: Path, stats, fits, best) -> None:
    """The statistics, the residual table (printed and saved) and the residual heat map."""
    stats.save(out / "stats.safetensors")
    table = residual_table(fits, best)
    print(table)
    atomic_write_text(out / "residuals.txt", table + "\n")
    plot_residuals(fits, out / "residuals.png", best)


def manifest_fields(cfg: StitchBuildConfig, fits, best, seconds: float) -> dict:
    """The fit, config and data fields shared by the closed-form and the finetuned artifact."""
    return dict(fit={"residuals": residual_record(fits), "chosen_residual": best.rel_residual,
                     "probe_images": cfg.probe_images, "seconds": round(seconds, 1)},
                config=to_dict(cfg), data=cfg.data)


def build(cfg: StitchBuildConfig) -> Path:
    """Run the whole build; returns the artifact folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = registry.resolve_device(cfg.device)
    print(f"building on {device}")
    backbone, reward, codec = load_models(cfg, device)
    probe = load_images(cfg.data, 1, "train", cfg.seed)[0].to(device)
    latent_hw = tuple(codec.encode(probe).shape[-2:])

    t0 = time.time()
    stats, fits, best, layer = fit_stitch(backbone, reward, codec, cfg, latent_hw, "stitchvm")
    write_fit_report(out, stats, fits, best)
    vm = StitchVM(backbone, reward, layer, best.i, best.j)
    common = manifest_fields(cfg, fits, best, time.time() - t0)
    artifact.save(vm, out / "closed_form", finetuned=False, **common)

    train = teacher_targets(reward, codec, load_images(cfg.data, cfg.finetune.train_images, "train", cfg.seed)[0])
    val = teacher_targets(reward, codec, load_images(cfg.data, cfg.finetune.val_images, "val", cfg.seed)[0])
    t1 = time.time()
    hist = finetune(vm, reward, train, val, cfg.finetune, out / "ckpt", desc="finetune stitchvm")
    artifact.save(vm, out, finetuned=True, history=hist, finetune_seconds=round(time.time() - t1, 1), **common)
    if cfg.baselines:
        build_baselines(cfg, backbone, reward, codec, latent_hw, train, val, out)
    print(f"StitchVM written to {out}")
    return out


def build_baselines(cfg, backbone, reward, codec, latent_hw, train: Targets, val: Targets, out: Path) -> None:
    """VAE-stitch (identity prefix, same init, 3x steps) and NoisyReward (from scratch, 3x steps)."""
    from dataclasses import replace

    long = replace(cfg.finetune, steps=3 * cfg.finetune.steps)
    ident = LatentTokens(backbone.latent_channels)
    ident.name = f"latent:{backbone.name}"
    _, fits, best, layer = fit_stitch(ident, reward, codec, cfg, latent_hw, "vae_stitch")
    vae_vm = StitchVM(ident, reward, layer, best.i, best.j)
    t1 = time.time()
    hist = finetune(vae_vm, reward, train, val, long, out / "ckpt_vae_stitch", desc="finetune vae-stitch")
    artifact.save(vae_vm, out / "vae_stitch", finetuned=True, history=hist, fit={"residuals": residual_record(fits)},
                  finetune_seconds=round(time.time() - t1, 1))
    noisy = NoisyReward(reward, backbone.latent_channels, latent_hw, seed=cfg.seed)
    t1 = time.time()
    hist = finetune(noisy, reward, train, val, long, out / "ckpt_noisy_reward", desc="train noisy-reward")
    noisy.save(out / "noisy_reward", history=hist, seconds=round(time.time() - t1, 1), steps=long.steps)


def main(argv: list[str] | None = None) -> None:
    """CLI: key=value overrides of StitchBuildConfig (optionally config=FILE.yaml first)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml = next((a.split("=", 1)[1] for a in argv if a.startswith("config=")), None)
    cfg = load_config(StitchBuildConfig, [a for a in argv if not a.startswith("config=")], yaml)
    out = build(cfg)
    print(json.dumps({"artifact": str(out), **{k: artifact.read_manifest(out)[k] for k in ("i", "j")}}))


if __name__ == "__main__":
    main()
