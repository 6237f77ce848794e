"""Stage 1 data: paired features of every (i, j) from one backbone pass and one reward-prefix pass per batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from rlstitch.models.device import model_device
from rlstitch.sampling.flow import forward_noise
from rlstitch.stitch.layer import resample_tokens
from rlstitch.stitch.stats import StitchStats


def probe_noise(batch: int, latent_shape: Sequence[int], seed: int) -> tuple[Tensor, Tensor]:
    """t ~ U[0, 1] and eps for a probe batch, deterministic from the seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, generator=g), torch.randn(batch, *latent_shape, generator=g)


@torch.no_grad()
def paired_features(backbone, reward, codec, images: Tensor, t: Tensor, eps: Tensor, blocks_u: Sequence[int],
                    blocks_r: Sequence[int]) -> tuple[dict, dict, dict]:
    """DiT tokens after each block i (noisy latent) and reward tokens entering each block j (clean image),
    both on the reward's patch grid; plus the reward's [CLS] entering each j."""
    z0 = codec.encode(images)
    zt = forward_noise(z0, t, eps)
    every = backbone.features_all(zt, t, None, upto=max(blocks_u))
    grid_u, grid_r = backbone.grid(tuple(z0.shape[-2:])), reward.grid
    feats_u = {i: resample_tokens(every[i - 1].float(), grid_u, grid_r) for i in blocks_u}
    prefix = reward.prefix_all(images, max(blocks_r))
    k = reward.num_prefix_tokens
    feats_r = {j: prefix[j][:, k:].float() for j in blocks_r}
    cls_r = {j: prefix[j][:, 0].float() for j in blocks_r}
    return feats_u, feats_r, cls_r


def empty_stats(backbone, reward, latent_hw: tuple[int, int], j_max: int) -> StitchStats:
    """Statistics for every DiT block i and reward block j <= j_max."""
    gh, gw = reward.grid
    return StitchStats(range(1, backbone.num_blocks + 1), range(0, j_max + 1), backbone.hidden_dim, reward.width,
                       gh * gw)


def collect_stats(backbone, reward, codec, batches: Iterable[tuple[int, Tensor]], j_max: int, latent_hw,
                  progress: bool = True, total: int | None = None) -> StitchStats:
    """Accumulate statistics over (batch_seed, images) pairs on the reward's device; the noise of each batch comes
    from its seed."""
    stats = empty_stats(backbone, reward, latent_hw, j_max)
    shape = (backbone.latent_channels, *latent_hw)
    device = model_device(reward)
    for seed, images in tqdm(batches, desc="stitch stats", total=total, disable=not progress):
        images = images.to(device)
        # Noise is drawn on the CPU so that a batch's seed gives the same statistics on any device.
        t, eps = (x.to(device) for x in probe_noise(images.shape[0], shape, seed))
        stats.update(*paired_features(backbone, reward, codec, images, t, eps, stats.blocks_u, stats.blocks_r))
    return stats
