"""Tweedie and Monte Carlo value estimators against hand-computed cases on tiny random models."""

import pytest
import torch

from rlstitch.models.codec import LatentCodec
from rlstitch.sampling.flow import FlowSampler
from rlstitch.tinyworld import models as tm
from rlstitch.value.estimators import MonteCarlo, Tweedie

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def codec():
    """The tiny VAE architecture with random weights."""
    return LatentCodec(tm.build("vae", seed=0).eval().requires_grad_(False))


def test_tweedie_scores_the_decoded_one_step_estimate(random_backbone, tiny_clip_reward, codec):
    torch.manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        want = tiny_clip_reward.score(codec.decode(z - t.view(-1, 1, 1, 1) * random_backbone.velocity(z, t)), PROMPTS)
        got = Tweedie(random_backbone, codec, tiny_clip_reward).value(z, t, PROMPTS)
    torch.testing.assert_close(got, want)


def test_monte_carlo_at_t0_is_the_clean_reward_and_is_seeded(random_backbone, tiny_clip_reward, codec):
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    mc = MonteCarlo(random_backbone, codec, tiny_clip_reward, k=2, steps=4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(mc.value(z, 0.0, PROMPTS), tiny_clip_reward.score(codec.decode(z), PROMPTS))
        a, b = mc.value(z, 0.5, PROMPTS), mc.value(z, 0.5, PROMPTS)
        other = MonteCarlo(random_backbone, codec, tiny_clip_reward, k=2, steps=4, seed=6).value(z, 0.5, PROMPTS)
    torch.testing.assert_close(a, b)  # the rollouts' noise comes from the estimator's seed, not the global RNG
    assert not torch.equal(a, other)


def test_monte_carlo_averages_k_rollouts(random_backbone, tiny_clip_reward, codec):
    """Hand-computed: two SDE rollouts from grid index 2 of 4 with the estimator's generator, decoded and scored."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    sampler, gen = FlowSampler(steps=4, sde=True), torch.Generator().manual_seed(5)
    with torch.no_grad():
        scores = [tiny_clip_reward.score(codec.decode(sampler.sample(random_backbone.velocity, z, start=2,
                                                                     generator=gen).z), PROMPTS) for _ in range(2)]
        got = MonteCarlo(random_backbone, codec, tiny_clip_reward, k=2, steps=4, seed=5).value(z, 0.5, PROMPTS)
    torch.testing.assert_close(got, torch.stack(scores).mean(0))


def test_monte_carlo_checks_its_inputs_before_any_rollout(random_backbone, tiny_clip_reward, codec):
    calls = []
    backbone = type("Counting", (), {"latent_channels": 4,
                                     "velocity": lambda self, z, t: calls.append(t) or random_backbone.velocity(z, t)})()
    mc = MonteCarlo(backbone, codec, tiny_clip_reward, k=2, steps=4)
    z = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="got 1 prompts for a batch of 2 latents"):
        mc.value(z, 0.5, PROMPTS[:1])
    with pytest.raises(ValueError, match="one t per call"):
        mc.value(z, torch.tensor([0.5, 0.25]), PROMPTS)
    assert calls == []
