"""Baseline value estimators: Tweedie (denoise once, decode, reward) and Monte Carlo (K rollouts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlstitch.sampling.flow import FlowSampler, bcast
from rlstitch.value.base import ValueEstimator, check_latent, check_prompts


class Tweedie(ValueEstimator):
    """r(D(z0_hat)) with z0_hat = z_t - t v(z_t, t): one denoiser call, a decode and the reward."""

    name = "tweedie"

    def __init__(self, backbone, codec, reward):
        super().__init__(reward)
        self.backbone, self.codec = backbone, codec
        self.latent_channels = backbone.latent_channels

    def embed(self, z: Tensor, t: Tensor) -> Tensor:
        """Reward embedding of the decoded one-step estimate (null text condition)."""
        z0 = z - bcast(t, z) * self.backbone.velocity(z, t)
        return self.reward.embed_image(self.codec.decode(z0))


class MonteCarlo(ValueEstimator):
    """Mean reward over K stochastic (SDE) rollouts from z_t to 0 with the remaining steps of the grid."""

    name = "monte_carlo"

    def __init__(self, backbone, codec, reward, k: int = 4, steps: int = 20, seed: int = 0):
        super().__init__(reward)
        self.backbone, self.codec, self.k, self.seed = backbone, codec, k, seed
        self.sampler = FlowSampler(steps=steps, sde=True)
        self.latent_channels = backbone.latent_channels

    def value(self, z: Tensor, t: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        """Average reward of K rollouts; t must be one time for the whole batch."""
        t = check_latent(z, t, self.latent_channels, self.name)
        check_prompts(prompts, z.shape[0], self.name)  # before the rollouts, not after the first one
        if not bool((t == t[0]).all()):
            raise ValueError("monte_carlo: one t per call (rollouts share a time grid)")
        grid = self.sampler.timesteps()
        start = int(torch.argmin((grid - float(t[0])).abs()))
        gen = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.k):
            z0 = self.sampler.sample(self.backbone.velocity, z, start=start, generator=gen).z
            scores.append(self.reward.score(self.codec.decode(z0), prompts))
        return torch.stack(scores).mean(0)
