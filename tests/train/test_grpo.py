"""Flow-GRPO against hand-computed cases: the step's log-density, group advantages, the clipped loss at the
first update, the closed-form KL, config checks, and the Ray-free rollout -> learner round trip (ratio == 1)."""

from __future__ import annotations

import math

import pytest
import torch
from test_learner import PROMPTS, make
from torch.distributions import Normal, kl_divergence

from rlstitch.config import ConfigError, load_config
from rlstitch.sampling.flow import FlowSampler
from rlstitch.train.config import RecipeConfig
from rlstitch.train.grpo import (
    choose_steps,
    draw_window,
    gaussian_kl,
    group_advantages,
    grpo_loss,
    log_prob,
    padded_chunks,
    sde_step,
    step_gaussian,
)
from rlstitch.train.grpo_rollout import sample_recorded


def test_sde_step_matches_the_published_formulas_and_normal_log_density():
    g = torch.Generator().manual_seed(0)
    z, v, noise = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    t, tn, a = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.1]), 0.7
    mean, std = step_gaussian(z, v, t, tn, "sde", a)
    tb, tnb = t.view(-1, 1, 1, 1), tn.view(-1, 1, 1, 1)
    s = a * torch.sqrt(tb / (1 - tb))
    dt = tnb - tb
    torch.testing.assert_close(std, s * torch.sqrt(-dt))
    torch.testing.assert_close(mean, z * (1 + s**2 / (2 * tb) * dt) + v * (1 + s**2 * (1 - tb) / (2 * tb)) * dt)
    x, lp = sde_step(z, v, t, tn, noise, "sde", a)
    torch.testing.assert_close(x, mean + std * noise)
    ref = Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, ref, rtol=1e-6, atol=1e-6)


def test_cps_step_and_the_t_equal_one_stand_in():
    g = torch.Generator().manual_seed(1)
    z, v, x = (torch.randn(2, 4, 2, 2, generator=g) for _ in range(3))
    t, tn, a = torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.25]), 0.7
    mean, std = step_gaussian(z, v, t, tn, "cps", a)
    tb, tnb = t.view(-1, 1, 1, 1), tn.view(-1, 1, 1, 1)
    sd = tnb * math.sin(a * math.pi / 2)
    torch.testing.assert_close(std, sd)
    torch.testing.assert_close(mean, (1 - tnb) * (z - tb * v) + torch.sqrt(tnb**2 - sd**2) * (z + (1 - tb) * v))
    torch.testing.assert_close(log_prob(x, mean, std), Normal(mean, sd.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="t=0"):
        step_gaussian(z, v, t, torch.tensor([0.7, 0.0]), "cps", a)
    # sde at t=1: s_1 = a sqrt(1 / (1 - sigma_max)), sigma_max = the grid's next time (finite, not 1/0)
    grid = FlowSampler(10).timesteps()
    _, std1 = step_gaussian(z[:1], v[:1], 1.0, float(grid[1]), "sde", a, sigma_max=float(grid[1]))
    want = a * math.sqrt(1 / (1 - float(grid[1]))) * math.sqrt(1 - float(grid[1]))
    assert abs(float(std1.flatten()[0]) - want) < 1e-6
    with pytest.raises(ValueError, match="sigma_max"):
        step_gaussian(z[:1], v[:1], 1.0, 0.9, "sde", a)


def test_group_advantages_on_a_hand_made_group():
    r = torch.tensor([1.0, 3.0, 0.0, 0.0])  # groups (1, 3) and (0, 0)
    glob = group_advantages(r, 2, global_std=True)
    std = math.sqrt(((1 - 1) ** 2 + (3 - 1) ** 2 + 1 + 1) / 4)  # population std of 1, 3, 0, 0 (mean 1)
    torch.testing.assert_close(glob, torch.tensor([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0]))
    per = group_advantages(r, 2, global_std=False)  # group std 1 and 0: the flat group gets 0, not NaN
    torch.testing.assert_close(per, torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0.0, 0.0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_ratio_is_one_and_the_clipped_loss_gradient_at_the_first_update():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 7.0, 0.5])  # 7 is clipped to adv_clip_max=5
    out = grpo_loss(logp, logp.detach().clone(), adv, clip_range=1e-4, adv_clip_max=5.0)
    assert float(out.ratio_mean) == 1.0 and float(out.clip_frac) == 0.0
    assert float(out.policy_loss) == pytest.approx(-(2 - 1 + 5 + 0.5) / 4)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([2.0, -1.0, 5.0, 0.5]) / 4)
    # past the clip range the clipped branch wins and the gradient vanishes for a positive advantage
    lp = torch.tensor([0.1], requires_grad=True)
    grpo_loss(lp, torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.05).loss.backward()
    assert float(lp.grad) == 0.0
    # weights: a padding row with weight 0 changes neither the loss nor the real rows' gradients
    lw = torch.tensor([-1.0, -1.0], requires_grad=True)
    w = grpo_loss(lw, lw.detach(), torch.tensor([1.0, 9.0]), weight=torch.tensor([1.0, 0.0]))
    w.loss.backward()
    assert float(w.policy_loss) == -1.0 and lw.grad.tolist() == [-1.0, 0.0]


def test_kl_is_closed_form_and_zero_at_the_reference():
    g = torch.Generator().manual_seed(2)
    mean, ref = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    std = torch.tensor([0.3, 0.7]).view(-1, 1, 1)
    want = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref))).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_kl(mean, ref, std), want)
    assert gaussian_kl(mean, mean, std).abs().max() == 0
    lp = torch.zeros(2, requires_grad=True)
    out = grpo_loss(lp, lp.detach(), torch.ones(2), kl=gaussian_kl(mean, mean, std), beta=0.04)
    assert float(out.kl) == 0.0 and float(out.loss.detach()) == float(out.policy_loss)


def test_windows_subsets_and_padded_chunks():
    gen = torch.Generator().manual_seed(0)
    assert draw_window([0, 4], 0, gen) == (0, 4)
    starts = {draw_window([1, 6], 2, gen)[0] for _ in range(50)}
    assert starts == {1, 2, 3, 4}
    picks = choose_steps(5, 4, 2, gen)
    assert picks.shape == (5, 2) and all(len(set(r.tolist())) == 2 for r in picks) and int(picks.max()) < 4
    chunks = padded_chunks(5, 2)
    assert [c.tolist() for c, _ in chunks] == [[0, 1], [2, 3], [4, 4]] and [r for _, r in chunks] == [2, 2, 1]


@pytest.mark.parametrize("override, message", [
    (["grpo.variant=ddim"], "grpo.variant"),
    (["grpo.sde_window=[0,5]"], "sde_window"),  # ends after the earliest stop (4)
    (["grpo.timesteps_per_sample=5"], "timesteps_per_sample"),
    (["grpo.window_size=5"], "window_size"),
    (["sampler.sde=true"], "sampler.sde=false"),
    (["grpo.variant=cps", "mode=baseline", "grpo.sde_window=[0,10]"], "sde_window"),
])
def test_config_names_the_bad_grpo_knob(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RecipeConfig, ["algorithm=grpo", *override])


GRPO = ["algorithm=grpo", "rollout.prompts_per_iteration=2", "rollout.group_size=2", "train.micro_batch=3",
        "lora.rank=4", "sampler.steps=4", "rollout.stop_window=[2,3]", "grpo.sde_window=[0,2]", "train.lr=1e-2",
        "grpo.timesteps_per_sample=2", "grpo.clip_range=0.2"]


@pytest.mark.parametrize("variant", ["sde", "cps"])
def test_learner_recomputes_the_sampler_log_probs_exactly(variant):
    cfg = load_config(RecipeConfig, [*GRPO, f"grpo.variant={variant}"])
    learner = make(cfg)
    with torch.no_grad():  # a trained-looking adapter, so the reference differs from the policy
        for p in learner.policy.named_trainable().values():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    cond = learner.cond(prompts)

    def velocity(z, t, rows):
        c = type(cond)(cond.tokens[rows], cond.pooled[rows])
        return learner.policy.velocity(z, t, c)

    z1 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(10 + k) for k in range(4)]
    grid = FlowSampler(4).timesteps()
    rec = sample_recorded(velocity, z1, grid, [2, 2, 3, 3], (0, 2), cfg.train.micro_batch, gens, variant)
    assert rec["logp"].shape == (4, 2) and torch.isfinite(rec["logp"]).all()
    assert torch.equal(rec["z_prev"][:, 1], rec["z_next"][:, 0])  # consecutive recorded steps chain
    batch = {k: rec[k] for k in ("z_prev", "z_next", "logp", "steps")} | {
        "adv": group_advantages(torch.tensor([0.1, 0.9, 0.4, 0.2]), 2), "prompts": prompts}
    before = {k: v.detach().clone() for k, v in learner.policy.named_trainable().items()}
    stats = learner.update(batch)
    assert stats["logp_abs_diff_max"] == 0.0  # fp32 on the CPU: bit-identical recomputation, ratio exactly 1
    assert stats["ratio_mean"] == 1.0 and stats["kl"] > 0
    after = learner.policy.named_trainable()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    stats = learner.update(batch)  # the same batch again: the policy moved, so the ratio is no longer 1
    assert stats["ratio_mean"] != 1.0 and stats["logp_abs_diff_max"] > 0


def test_sample_recorded_refuses_a_window_past_a_stop():
    with pytest.raises(ValueError, match="before every stop"):
        sample_recorded(lambda z, t, r: z, torch.zeros(2, 1, 2, 2), FlowSampler(4).timesteps(), [1, 3], (0, 2), 2,
                        [torch.Generator()] * 2)
