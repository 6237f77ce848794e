"""The algorithm registry: one object per algorithm, and every recipe's config names one of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlstitch.config import ConfigError, load_config
from rlstitch.train.algorithms import ALGORITHMS, algorithm
from rlstitch.train.config import RecipeConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_training_recipe_names_a_registered_algorithm():
    import yaml

    named = {yaml.safe_load(p.read_text()).get("algorithm") for p in (ROOT / "recipes" / "configs").glob("*/tiny.yaml")}
    assert {"nft", "draft", "grpo"} == set(ALGORITHMS) == named - {None}


def test_batches_carry_the_recorded_tensors_and_the_reward_signal():
    roll = {k: torch.zeros(4, 1) for k in ("z", "tau", "z_prev", "z_next", "logp", "steps")} | {"stops": torch.ones(4)}
    reward, prompts = torch.tensor([0.1, 0.9, 0.2, 0.8]), ["a", "a", "b", "b"]
    keys = {}
    for name in ALGORITHMS:
        cfg = load_config(RecipeConfig, [f"algorithm={name}", "rollout.group_size=2", "rollout.prompts_per_iteration=2"])
        keys[name] = set(algorithm(cfg).batch(cfg, roll, reward, prompts))
    assert keys == {"nft": {"z", "tau", "r", "prompts"}, "draft": {"z", "stop", "prompts"},
                    "grpo": {"z_prev", "z_next", "logp", "steps", "adv", "prompts"}}


def test_only_draft_refuses_stale_rollouts():
    with pytest.raises(ConfigError, match="DRaFT backpropagates"):
        load_config(RecipeConfig, ["algorithm=draft", "train.async_staleness=1", "draft.k=1"]).validate()
    with pytest.raises(ConfigError, match="algorithm must be one of"):
        load_config(RecipeConfig, ["algorithm=ppo"]).validate()
