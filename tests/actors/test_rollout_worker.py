"""The rollout worker in-process (no Ray): full sync first, versions, stops, saved steps, eval samples."""

from __future__ import annotations

import pytest
import torch

from rlstitch.config import load_config
from rlstitch.train.config import RecipeConfig
from rlstitch.train.policy import Policy


@pytest.fixture(scope="module")
def worker(random_world):
    from actors.rollout import RolloutWorker

    cfg = load_config(RecipeConfig, ["lora.rank=4", "sampler.steps=6", "rollout.stop_window=[2,4]"])
    return RolloutWorker(cfg, tiny_dir=str(random_world))


def learner_weights(random_world):
    """Adapter + base weights of a learner-side policy whose adapter was changed."""
    from rlstitch.models.registry import load_backbone

    pol = Policy(load_backbone("tiny-flux"), rank=4)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.01)
    return pol.state(), pol.base_state()


def test_first_sync_must_be_full_and_versions_are_reported(worker, random_world):
    adapter, base = learner_weights(random_world)
    with pytest.raises(RuntimeError, match="no weights yet"):
        worker.sample({"prompts": ["a red circle"], "seeds": [0], "stops": [3]})
    with pytest.raises(RuntimeError, match="full one"):
        worker.set_weights({"version": 0, "adapter": adapter})
    assert worker.set_weights({"version": 0, "adapter": adapter, "base": base})["version"] == 0
    assert worker.set_weights({"version": 1, "adapter": adapter})["version"] == 1  # adapter-only from now on
    torch.testing.assert_close(worker.policy.state(), adapter)


def test_sample_stops_each_rollout_and_is_seeded(worker):
    job = {"prompts": ["a red circle", "a blue square", "a red circle"], "seeds": [5, 6, 5], "stops": [2, 4, 2]}
    a = worker.sample(job)
    assert a["version"] == 1 and a["z"].shape == (3, 4, 8, 8)
    assert a["denoise_steps"] == 8  # 2 + 4 + 2 of 18: the rest was saved by stopping early
    torch.testing.assert_close(a["tau"], worker.sampler.timesteps()[[2, 4, 2]].float())
    torch.testing.assert_close(a["z"][0], a["z"][2])  # same prompt, seed and stop -> same latent
    torch.testing.assert_close(worker.sample(job)["z"], a["z"])
    d = worker.sample(job | {"draft_k": 1})  # DRaFT: one step before each stop
    assert d["denoise_steps"] == 5 and torch.equal(d["stops"], torch.tensor([2, 4, 2]))
    assert a["work"] == {"denoiser_fwd": 8} and d["work"] == {"denoiser_fwd": 5}  # counted where they run
    # nft.full_share: flagged rollouts also go on to t=0 and return that anchor (tau 0); the others keep z_tau
    f = worker.sample(job | {"full": [True, False, False]})
    torch.testing.assert_close(f["z"], a["z"])  # what is scored is unchanged
    full = worker.sample(job | {"stops": [6, 4, 2]})
    torch.testing.assert_close(f["z_anchor"][0], full["z"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f["z_anchor"][1:], a["z"][1:])
    assert f["tau_anchor"].tolist() == [0.0, *a["tau"][1:].tolist()]
    assert f["denoise_steps"] == 8 + 4 and f["work"] == {"denoiser_fwd": 12}


def test_generate_uses_the_eval_slot(worker, random_world):
    adapter, _ = learner_weights(random_world)
    with pytest.raises(RuntimeError, match="eval weights"):
        worker.generate({"prompts": ["a red circle"], "seeds": [0]})
    worker.set_weights({"version": 3, "slot": "evaluation", "adapter": adapter})
    out = worker.generate({"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "grid": 1})
    assert out["z"].shape == (2, 4, 8, 8) and out["images"].shape == (1, 3, 32, 32) and out["version"] == 3


def test_grpo_rollouts_record_the_window_and_stop_at_their_stops(worker, random_world):
    adapter, base = learner_weights(random_world)
    worker.set_weights({"version": 3, "adapter": adapter, "base": base})
    job = {"prompts": ["a red circle"] * 2 + ["a blue square"] * 2, "seeds": [5, 6, 7, 8], "stops": [2, 2, 4, 4],
           "window": [0, 2]}
    out = worker.sample_grpo(job)
    assert out["z_prev"].shape == (4, 2, 4, 8, 8) and out["logp"].shape == (4, 2) and out["version"] == 3
    assert out["steps"].tolist() == [[0, 1]] * 4 and out["denoise_steps"] == 12
    assert torch.equal(out["z"][:2], out["z_next"][:2, 1])  # stopped right after the window's last step
    assert not torch.equal(out["z"][2:], out["z_next"][2:, 1])  # two more (ODE) steps to stop 4
    assert out["tau"].tolist() == pytest.approx([4 / 6, 4 / 6, 2 / 6, 2 / 6])
    again = worker.sample_grpo(job | {"prompts": job["prompts"][2:] + job["prompts"][:2],
                                      "seeds": [7, 8, 5, 6], "stops": [4, 4, 2, 2]})
    torch.testing.assert_close(again["logp"], out["logp"][[2, 3, 0, 1]], rtol=0, atol=1e-5)  # seeded per sample


def test_a_fresh_worker_loads_the_weights_a_task_carries(random_world):
    """A restarted worker (fresh from its constructor) re-runs a lost task with the weights the task carries: the
    full sync first, then the task's version; a second task of that version loads nothing."""
    from actors.rollout import RolloutWorker, weights_payload

    adapter, base = learner_weights(random_world)
    cfg = load_config(RecipeConfig, ["lora.rank=4", "sampler.steps=6", "rollout.stop_window=[2,4]"])
    weights = {"version": 4, "ref": weights_payload(4, adapter), "base": weights_payload(0, adapter, base=base)}
    job = {"prompts": ["a red circle"], "seeds": [5], "stops": [3], "weights": weights}
    fresh = RolloutWorker(cfg, tiny_dir=str(random_world))
    loads = []
    fresh.set_weights = lambda payload, load=fresh.set_weights: loads.append(payload["version"]) or load(payload)
    a = fresh.sample(job)
    assert a["version"] == 4 and loads == [0, 4] and fresh.has_base
    torch.testing.assert_close(fresh.policy.state(), adapter)
    assert torch.equal(fresh.sample(job)["z"], a["z"]) and loads == [0, 4]  # held already: nothing reloaded
    out = fresh.generate({"prompts": ["a red circle"], "seeds": [0], "weights": weights | {"version": 5, "ref": weights_payload(5, adapter)}})
    assert out["version"] == 5 and loads == [0, 4, 5]  # the eval slot loads its own version
