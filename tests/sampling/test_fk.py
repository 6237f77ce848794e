"""FK steering: potentials, weights, ESS, resampling, argmax over M (hand-computed), schedules, counts, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from rlstitch.models.condition import Condition
from rlstitch.sampling import fk
from rlstitch.sampling.flow import FlowSampler


class TargetBackbone:
    """Exact velocity of unit Gaussian data around a prompt-dependent mean (0.1 * prompt length)."""

    latent_channels = 4

    def encode_prompts(self, prompts) -> Condition:
        """Prompt length as the pooled vector."""
        return Condition(torch.zeros(len(prompts), 1, 1), torch.tensor([[float(len(p))] for p in prompts]))

    def null_condition(self) -> Condition:
        """Zeros."""
        return Condition(torch.zeros(1, 1, 1), torch.zeros(1, 1))

    def velocity(self, z: Tensor, t, cond=None) -> Tensor:
        """v = (z - E[z0 | z_t]) / t with E[z0 | z_t] = mu + (1-t) (z - (1-t) mu) / ((1-t)^2 + t^2)."""
        t = max(float(t), 1e-3)
        mu = 0.1 * cond.pooled.view(-1, 1, 1, 1)
        z0 = mu + (1 - t) * (z - (1 - t) * mu) / ((1 - t) ** 2 + t**2)
        return (z - z0) / t


class SliceCodec:
    """First three latent channels as the image."""

    def decode(self, z: Tensor) -> Tensor:
        """Differentiable slice."""
        return z[:, :3]


class MeanReward:
    """Mean pixel value (prompts ignored)."""

    def score(self, images: Tensor, prompts=None) -> Tensor:
        """Mean per image."""
        return images.flatten(1).mean(1)


def mean_value(z: Tensor, t: float, prompts) -> Tensor:
    """A value model: the latent's mean (what MeanReward of the decoded image tracks)."""
    return z.flatten(1).mean(1)


# ----------------------------------------------------------------------------------- pure helpers


def test_potentials_by_hand():
    v, prev = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]])
    score, state = fk.potential("diff", v, prev)
    assert score.tolist() == [[0.5, 1.5]] and state.tolist() == [[1.0, 2.0]]
    score, state = fk.potential("max", torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -math.inf]]))
    assert score.tolist() == [[1.0, 2.0]] and state.tolist() == [[1.0, 2.0]]
    score, state = fk.potential("add", v, torch.tensor([[1.0, 1.0]]))
    assert score.tolist() == [[2.0, 3.0]] and state.tolist() == [[2.0, 3.0]]
    assert fk.initial_state("max", (1, 2)).tolist() == [[-math.inf, -math.inf]]
    assert fk.initial_state("diff", (1, 2)).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="unknown potential 'sum'"):
        fk.potential("sum", v, prev)


def test_weights_and_ess_by_hand():
    log_w = torch.log(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    torch.testing.assert_close(fk.normalized_weights(log_w), torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(fk.ess(log_w), torch.tensor([1 / (0.0625 + 0.5625), 2.0], dtype=torch.float64))
    # lambda * (V_new - V_prev): lambda 10, diffs (0, 0.1) -> weights proportional to (1, e)
    w = fk.normalized_weights(10 * torch.tensor([[0.0, 0.1]]))
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + math.e), math.e / (1 + math.e)]], dtype=torch.float64))


def test_adaptive_resampling_uses_ess_below_half_n():
    flat, peaked = torch.zeros(4), torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
    log_w = torch.stack([flat, peaked])
    assert fk.ess(log_w).tolist() == [4.0, 1.0]
    assert fk.needs_resample(log_w, adaptive=True).tolist() == [False, True]
    assert fk.needs_resample(log_w, adaptive=False).tolist() == [True, True]
    assert fk.needs_resample(torch.log(torch.tensor([[1.0, 1.0, 1.0, 5.0]])), adaptive=True).tolist() == [False]  # ESS 64/28


def test_resampling_by_hand_and_seeded():
    peaked = torch.tensor([[-math.inf, 0.0, -math.inf]])
    assert fk.resample_indices(peaked, [torch.Generator().manual_seed(0)]).tolist() == [[1, 1, 1]]
    log_w = torch.log(torch.tensor([[0.25, 0.75]])).expand(1, 2)
    draws = torch.cat([fk.resample_indices(log_w, [torch.Generator().manual_seed(s)]) for s in range(2000)])
    assert abs(float(draws.float().mean()) - 0.75) < 0.03  # index 1 drawn with probability 0.75
    a = fk.resample_indices(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)),
                            [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    b = fk.resample_indices(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)),
                            [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    assert torch.equal(a, b) and a.shape == (3, 8)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        fk.resample_indices(torch.zeros(3, 2), [torch.Generator()] * 2)


def test_argmax_over_m_proposals():
    values = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.1], [-1.0, -2.0, -0.5]])
    assert fk.select_proposals(values).tolist() == [1, 0, 2]


def test_schedules():
    assert fk.resample_steps(40, 4, 0.2, 0.8) == [8, 12, 16, 20, 24, 28, 32]  # SPEC: every 4 inside 8..32 of 40
    assert fk.resample_steps(10, 2, 0.0, 1.0) == [1, 3, 5, 7, 9]  # never at t=1 or at the final t=0
    assert fk.resample_steps(10, 0, 0.2, 0.8) == []
    assert fk.proposal_steps(40, 0.4) == list(range(16)) and fk.proposal_steps(10, 0.0) == []


def test_config_validation_names_the_knob():
    with pytest.raises(ValueError, match="potential='sum'"):
        fk.FKConfig(potential="sum").validate()
    with pytest.raises(ValueError, match="final_select"):
        fk.FKConfig(final_select="best").validate()
    with pytest.raises(ValueError, match="window_start"):
        fk.FKConfig(window_start=0.9, window_end=0.1).validate()
    for bad in ({"lam": -1.0}, {"lam": float("nan")}, {"resample_every": -2}):
        with pytest.raises(ValueError, match=r"lam \(.*\) and resample_every \(.*\) must be >= 0"):
            fk.FKConfig(**bad).validate()


def test_value_costs():
    assert fk.value_cost("tweedie") == {"denoiser": 1, "decoder": 1, "reward": 1}
    assert fk.value_cost("stitchvm") == {"stitchvm": 1}
    c = fk.EvalCounter()
    c.add({"denoiser": 2}, 5)
    c.add({"stitchvm": 1}, 3)
    assert c.counts == {"denoiser": 10, "stitchvm": 3} and c.total == 13


# ------------------------------------------------------------------------------------- end to end


def run(prompts, seeds, cfg, steps=10, value_fn=mean_value, cost=None):
    """FK steering with the stand-in models."""
    return fk.fk_steer(TargetBackbone(), SliceCodec(), MeanReward(), prompts, cfg, value_fn=value_fn,
                       cost=cost or {"stitchvm": 1}, sampler=FlowSampler(steps=steps, sde=True), cfg_scale=1.0,
                       seeds=seeds, latent_hw=(4, 4))


def test_fk_counts_every_network_evaluation():
    cfg = fk.FKConfig(particles=3, proposals=2, resample_every=2, window_start=0.2, window_end=0.8, proposal_frac=0.4)
    out = run(["ab", "abc"], [0, 1], cfg)
    P, N, M = 2, 3, 2
    prop, res = fk.proposal_steps(10, 0.4), fk.resample_steps(10, 2, 0.2, 0.8)  # [0..3], [2, 4, 6, 8]
    reused = sum(1 for k in res if k - 1 in prop)  # a proposal step's values feed the next resampling
    want_values = len(prop) * P * N * M + (len(res) - reused) * P * N
    assert out.counter.counts == {"denoiser": 10 * P * N, "stitchvm": want_values, "decoder": P * N, "reward": P * N}
    assert [k for k, _ in out.ess] == res and out.resampled == len(res) * P
    assert out.images.shape == (P, 3, 4, 4) and out.particles.shape == (P * N, 4, 4, 4)
    # the kept sample is each prompt's best particle under the clean reward
    best = MeanReward().score(SliceCodec().decode(out.particles).clamp(-1, 1)).view(P, N).max(-1).values
    torch.testing.assert_close(out.rewards, best)


def test_fk_is_seeded_and_per_prompt():
    cfg = fk.FKConfig(particles=4, proposals=3, resample_every=2)
    a, b = run(["ab", "abcd"], [0, 1], cfg), run(["ab", "abcd"], [0, 1], cfg)
    torch.testing.assert_close(a.particles, b.particles, atol=0, rtol=0)
    alone = run(["abcd"], [1], cfg)  # a prompt's run does not depend on the other prompts in the batch
    torch.testing.assert_close(alone.particles, a.particles[4:], atol=1e-6, rtol=0)
    other = run(["ab", "abcd"], [2, 1], cfg)
    assert not torch.allclose(other.particles[:4], a.particles[:4])


def test_steering_and_proposals_raise_the_reward_over_plain_sampling():
    prompts, seeds = ["ab"] * 8, list(range(8))
    plain = run(prompts, seeds, fk.FKConfig(particles=1, resample_every=0))
    steered = run(prompts, seeds, fk.FKConfig(particles=4, proposals=4, resample_every=2, lam=50.0))
    assert float(steered.rewards.mean()) > float(plain.rewards.mean()) + 0.05


def test_proposals_keep_the_argmax_under_v():
    sampler, z = FlowSampler(steps=10, sde=True), torch.randn(6, 4, 4, 4)
    values = fk._Values(mean_value, {"stitchvm": 1}, fk.EvalCounter(), chunk=4)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    kept, vals = fk._propose(sampler, z, torch.zeros_like(z), 0.9, 0.8, gens, 5, values, ["a"] * 6)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    allc = sampler.step(z.repeat_interleave(5, 0), torch.zeros(30, 4, 4, 4), 0.9, 0.8, fk._row_gens(gens, 15))
    allv = mean_value(allc, 0.8, None).view(6, 5)
    torch.testing.assert_close(vals, allv.max(-1).values)
    torch.testing.assert_close(kept, allc.view(6, 5, 4, 4, 4)[torch.arange(6), allv.argmax(-1)])
    assert values.counter.counts == {"stitchvm": 30}


def test_best_of_n_and_errors():
    out = fk.best_of_n(TargetBackbone(), SliceCodec(), MeanReward(), ["ab"], 5, sampler=FlowSampler(steps=4, sde=True),
                       cfg_scale=1.0, seeds=[0], latent_hw=(4, 4))
    assert "stitchvm" not in out.counter.counts and out.counter.counts["decoder"] == 5
    with pytest.raises(ValueError, match="needs a value model"):
        run(["ab"], [0], fk.FKConfig(particles=2, resample_every=2), value_fn=None)
    with pytest.raises(ValueError, match="stochastic sampler"):
        fk.fk_steer(TargetBackbone(), SliceCodec(), MeanReward(), ["ab"], fk.FKConfig(), value_fn=mean_value,
                    sampler=FlowSampler(steps=4), cfg_scale=1.0, latent_hw=(4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        run(["ab"], [0], fk.FKConfig(particles=2, resample_every=2), value_fn=lambda z, t, p: torch.full((len(z),), math.nan))


def test_equal_weights_never_resample_whatever_the_threshold():
    # ESS = N exactly for equal weights; rounding (e.g. 4.999999999999999 for N=5) must not trigger a resample
    for n in range(1, 33):
        log_w = torch.full((2, n), 0.3)
        assert fk.needs_resample(log_w, adaptive=True, threshold=1.0).tolist() == [False, False], n
    assert fk.needs_resample(torch.tensor([[0.0, 0.0, 0.0, 1e-3]]), adaptive=True, threshold=1.0).tolist() == [True]
