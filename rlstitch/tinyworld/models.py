"""Architectures of the tiny world: the same classes as the real systems, at a size 2 CPU cores can train.

Proportions mirror SD3.5-M + CLIP ViT-L/14: the generator's forward costs several times the reward's,
and the generator's token grid (8x8, patch 1 on an 8x8x4 latent) equals the reward's patch grid (8x8,
patch 4 on 32x32 pixels). See the model card for FLOPs per call.
"""

from __future__ import annotations

import torch

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
LATENT_SIZE = 8
TEXT_CONTEXT = 12
CLIP_WIDTH = 64
CLIP_EMBED = 64
GEN_HEADS, GEN_HEAD_DIM = 2, 64


def vae_config() -> dict:
    """AutoencoderKL: 32x32x3 <-> 8x8x4."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=16, scaling_factor=1.0,
    )


def clip_config(words: list[str]) -> dict:
    """open_clip CLIP: a 6-block ViT (patch 4) image tower and a 4-block text tower over a word vocabulary."""
    vocab = len(words) + 4  # <pad> <unk> ... <sot> <eot>
    return dict(
        embed_dim=CLIP_EMBED,
        vision_cfg=dict(image_size=IMAGE_SIZE, patch_size=4, width=CLIP_WIDTH, layers=6, head_width=32, mlp_ratio=4.0),
        text_cfg=dict(context_length=TEXT_CONTEXT, vocab_size=vocab, width=CLIP_WIDTH, heads=2, layers=4),
        tokenizer=dict(words=list(words)),
        mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
    )


def aesthetic_hidden() -> list[int]:
    """Hidden sizes of the tiny aesthetic MLP (LAION's is 1024, 128, 64, 16)."""
    return [128, 64, 16]


def sd3_config() -> dict:
    """SD3Transformer2DModel: 8 joint blocks, width 128, patch 1 (8x8 tokens), conditioned on the tiny text tower."""
    return dict(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=8, attention_head_dim=GEN_HEAD_DIM, num_attention_heads=GEN_HEADS,
        joint_attention_dim=CLIP_WIDTH, caption_projection_dim=GEN_HEADS * GEN_HEAD_DIM,
        pooled_projection_dim=CLIP_EMBED, pos_embed_max_size=LATENT_SIZE, qk_norm="rms_norm",
    )


def flux_config() -> dict:
    """FluxTransformer2DModel: 4 double + 4 single blocks, width 128, pack 1 (8x8 tokens), no guidance embedding."""
    return dict(
        patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=4, num_single_layers=4,
        attention_head_dim=GEN_HEAD_DIM, num_attention_heads=GEN_HEADS, joint_attention_dim=CLIP_WIDTH,
        pooled_projection_dim=CLIP_EMBED, guidance_embeds=False, axes_dims_rope=(8, 28, 28),
    )


def build(kind: str, words: list[str] | None = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of `kind` (vae, clip, sd3, flux) — for training and tests only."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    if kind == "vae":
        return AutoencoderKL(**vae_config())
    if kind == "sd3":
        return SD3Transformer2DModel(**sd3_config())
    if kind == "flux":
        return FluxTransformer2DModel(**flux_config())
    if kind == "clip":
        cfg = clip_config(words or ["a"])
        return CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]))
    raise ValueError(f"unknown tiny model kind {kind!r}")
