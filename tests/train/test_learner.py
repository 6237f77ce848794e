"""The Ray-free learner: LoRA slots, NFT / DRaFT updates, exact state round trip (plain torch engine)."""

from __future__ import annotations

import pytest
import torch

from rlstitch.config import load_config
from rlstitch.sampling.flow import FlowSampler
from rlstitch.train import lora as L
from rlstitch.train.algorithms import algorithm
from rlstitch.train.config import RecipeConfig
from rlstitch.train.learner import Learner, TorchEngine, accumulation_steps
from rlstitch.train.policy import REF, Policy, PromptStream, draw_stops, sample_to_stops

PROMPTS = ["a red circle", "a blue square", "a small green triangle", "a large yellow circle"]
SMALL = ["rollout.prompts_per_iteration=2", "rollout.group_size=2", "train.micro_batch=2", "lora.rank=4",
         "sampler.steps=4", "rollout.stop_window=[1,3]", "train.lr=1e-3"]


def make(cfg: RecipeConfig, value=None) -> Learner:
    """A learner on a fresh random tiny FLUX (same seed every time)."""
    from rlstitch.models import FluxBackbone
    from rlstitch.models.reward import ClipReward
    from rlstitch.models.tokenizer import WordTokenizer
    from rlstitch.tinyworld import models as tm

    words = sorted({w for p in PROMPTS for w in p.split()})
    ccfg = tm.clip_config(words)
    clip = ClipReward(tm.build("clip", words, seed=0).eval(), WordTokenizer(words, ccfg["text_cfg"]["context_length"]))
    backbone = FluxBackbone(tm.build("flux", seed=1).eval(), clip.text_condition, name="rand-flux", pack=1)
    policy = Policy(backbone, True, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets,
                    slots=algorithm(cfg).slots)
    engine = TorchEngine(policy, policy.trainable_parameters(), cfg, accumulation_steps(cfg, 1))
    return Learner(cfg, policy, engine, value=value)


def nft_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"z": torch.randn(4, 4, 8, 8, generator=g), "tau": torch.tensor([0.5, 0.5, 0.25, 0.25]),
            "r": torch.rand(4, generator=g), "prompts": [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2}


def test_lora_slots_switch_without_touching_requires_grad():
    cfg = load_config(RecipeConfig, SMALL)
    pol = make(cfg).policy
    trainable = [n for n, p in pol.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n and "lora_" in n for n in trainable)
    with torch.no_grad():
        for p in L.adapter_params(pol.model).values():
            p.add_(0.05)  # the default adapter now differs from "old" and from the base
    z, cond = torch.randn(2, 4, 8, 8), pol.backbone.encode_prompts(PROMPTS[:2])
    v_def, v_old, v_ref = (pol.velocity(z, 0.5, cond, s) for s in ("default", "old", REF))
    assert not torch.allclose(v_def, v_old) and torch.allclose(v_old, v_ref, atol=1e-6)  # old: B = 0 like the base
    assert [n for n, p in pol.model.named_parameters() if p.requires_grad] == trainable
    state = pol.state()
    assert all(".default." not in k for k in state) and pol.state("old").keys() == state.keys()
    pol.load_state(state, "old")
    torch.testing.assert_close(pol.velocity(z, 0.5, cond, "old"), v_def)


def test_sample_to_stops_matches_separate_runs():
    sampler = FlowSampler(steps=5)
    z = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    vel = lambda x, t, rows: x * (1 + t) + rows.view(-1, 1, 1, 1).float()  # noqa: E731
    out = sample_to_stops(vel, z, sampler, [2, 5, 0])
    for i, stop in enumerate([2, 5, 0]):
        one = sampler.sample(lambda x, t, i=i: vel(x, t, torch.tensor([i])), z[i : i + 1], stop=stop).z
        torch.testing.assert_close(out[i : i + 1], one)


def test_draw_stops_and_prompt_stream_resume():
    g = torch.Generator().manual_seed(0)
    stops = draw_stops(8, [3, 7], 10, g, group_size=4)
    assert stops[:4] == [stops[0]] * 4 and all(3 <= s <= 7 for s in stops)
    assert draw_stops(3, None, 10, g) == [10, 10, 10]
    with pytest.raises(ValueError, match="inside 1..10"):
        draw_stops(2, [0, 11], 10, g)
    a = PromptStream(PROMPTS, seed=1)
    assert sorted(a.next(4)) == sorted(PROMPTS)  # one epoch visits every prompt once
    a.next(3)
    b = PromptStream(PROMPTS, seed=1)
    b.load_state(a.state())
    assert a.next(6) == b.next(6) and a.state() == b.state() == {"epoch": 3, "offset": 1, "size": 4, "seed": 1}


def test_nft_update_and_exact_state_round_trip():
    cfg = load_config(RecipeConfig, SMALL)
    straight = make(cfg)
    stats = straight.update(nft_batch(0))
    assert stats["step"] == 1 and stats["loss"] > 0 and stats["grad_norm"] > 0 and stats["old_decay"] == 0.001
    saved = straight.state()
    straight.update(nft_batch(1))

    resumed = make(cfg)
    resumed.load_state(saved)
    resumed.update(nft_batch(1))
    for slot in ("default", "old"):
        a, b = straight.policy.state(slot), resumed.policy.state(slot)
        assert all(torch.equal(a[k], b[k]) for k in a), slot
    assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    # the old policy moved towards the trained weights, and the EMA lags them
    cur, old = straight.policy.state(), straight.policy.state("old")
    assert any(not torch.equal(cur[k], old[k]) for k in cur if "lora_B" in k)


def test_draft_update_uses_the_value_gradient():
    cfg = load_config(RecipeConfig, [*SMALL, "algorithm=draft", "draft.k=1"])
    target = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    calls = []

    def value(z, t, prompts):  # V = -||z - target||^2, gradient by hand
        calls.append(t.clone())
        return -(z - target).square().flatten(1).sum(1), -2 * (z - target)

    learner = make(cfg, value)
    batch = {"z": torch.randn(4, 4, 8, 8), "stop": torch.tensor([2, 2, 3, 3]), "prompts": PROMPTS[:2] * 2}
    before = {k: v.clone() for k, v in learner.policy.state().items()}
    stats = learner.update(batch)
    assert stats["step"] == 1 and torch.isfinite(torch.tensor(stats["loss"]))
    seen = torch.cat(calls)  # one value call per micro-batch, at each sample's stop time
    assert sorted(seen.tolist()) == sorted(learner.grid[torch.tensor([2, 2, 3, 3])].float().tolist())
    after = learner.policy.state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_config_errors_name_the_knob():
    from rlstitch.config import ConfigError

    with pytest.raises(ConfigError, match="placement.rollout.num_workers"):
        load_config(RecipeConfig, ["rollout.prompts_per_iteration=3", "placement.rollout.num_workers=2"])
    with pytest.raises(ConfigError, match="rollout.stop_window"):
        load_config(RecipeConfig, ["rollout.stop_window=[4,12]"])
    with pytest.raises(ConfigError, match="train.micro_batch"):
        load_config(RecipeConfig, ["train.micro_batch=24"])
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(RecipeConfig, ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match="unknown|not in|bogus"):
        load_config(RecipeConfig, ["train.bogus=1"])


def test_prompt_stream_resumes_in_the_checkpoints_order_whatever_the_new_seed():
    a = PromptStream(PROMPTS, seed=1)
    a.next(3)
    b = PromptStream(PROMPTS, seed=2)  # a resume whose train.seed differs from the checkpoint's
    b.load_state(a.state())
    assert b.next(9) == a.next(9)  # neither repeats nor skips a prompt of the saved order


@pytest.mark.parametrize(("override", "knob"), [
    (["sampler.shift=0"], "sampler.shift"),
    (["sampler.shift=-2"], "sampler.shift"),
    (["reward.names=[tiny-clip,tiny-clip]", "reward.weights=[0.5,0.5]", "reward.stitches=[a,b]"], "reward.names"),
    (["eval.rewards=[tiny-clip,tiny-clip]"], "eval.rewards"),
    (["checkpoint.keep=-1"], "checkpoint.keep"),
    (["nft.kl_weight=-0.1"], "nft.kl_weight"),
])
def test_config_rejects_degenerate_schedules_and_duplicate_rewards(override, knob):
    from rlstitch.config import ConfigError

    with pytest.raises(ConfigError, match=knob.replace(".", r"\.")):
        load_config(RecipeConfig, override)


def test_full_finetuning_publishes_ema_weights_a_rollout_policy_can_load():
    # lora.enabled=false on a transformer with buffers (SD3's pos_embed): the EMA eval sync must carry them too
    from rlstitch.models.backbone import SD3Backbone
    from rlstitch.tinyworld import models as tm

    cfg = load_config(RecipeConfig, [*SMALL, "algorithm=draft", "lora.enabled=false", "eval.use_ema=true"])
    assert any(True for _ in tm.build("sd3", seed=1).buffers())
    policy = Policy(SD3Backbone(tm.build("sd3", seed=1).eval(), name="rand-sd3"), lora=False)
    learner = Learner(cfg, policy, TorchEngine(policy, policy.trainable_parameters(), cfg, 1),
                      value=lambda z, t, p: (z.sum((1, 2, 3)), torch.ones_like(z)))
    rollout = Policy(SD3Backbone(tm.build("sd3", seed=2).eval(), name="rand-sd3"), lora=False, slots=("evaluation",))
    for which in ("ema", "current"):
        rollout.load_state(learner.weights(which), "evaluation")
        assert all(torch.equal(v, learner.weights(which)[k]) for k, v in rollout.state("evaluation").items())


def test_continue_to_end_finishes_stopped_rollouts():
    from rlstitch.train.policy import continue_to_end

    sampler = FlowSampler(steps=6)
    w = torch.randn(4, 4)

    def velocity(z, t, rows):  # a smooth field that depends on t and the row's own state
        return torch.tanh(z @ w) * (1 + t)

    z1 = torch.randn(3, 4, 2, 4)
    full = sample_to_stops(velocity, z1, sampler, [6, 6, 6])
    stopped = sample_to_stops(velocity, z1, sampler, [2, 4, 6])
    out = continue_to_end(velocity, stopped, sampler, [2, 4, 6])
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-6)
    # a start at the last step leaves the row as it is
    torch.testing.assert_close(continue_to_end(velocity, stopped, sampler, [6, 6, 6]), stopped)
    with pytest.raises(ValueError, match="one start"):
        continue_to_end(velocity, stopped, sampler, [7, 0, 0])


def test_spearman_and_scorer_work():
    from actors.trainer.accounting import spearman
    from rlstitch.train.scoring import Scorer

    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 2) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(4)) == 0.0  # a constant score ranks nothing
    s = Scorer({"v": object(), "c": object()}, {"v": 1.0, "c": 1.0},
               {"v": (("value_fwd/i=3",), ("value_bwd/i=3",)), "c": (("decode", "reward"), ("decode_reward_bwd",))})
    assert s.work(8) == {"value_fwd/i=3": 8, "decode": 8, "reward": 8}
    assert s.work(2, grad=True)["value_bwd/i=3"] == 2 and s.work(2, grad=True)["decode_reward_bwd"] == 2
