"""recipes/grpo_sd35.py on Ray + DeepSpeed (tiny, random world): every iteration's recomputed log-probabilities
equal the rollout workers' (fp32, max |delta logp| == 0), the policy trains, and a run stopped and resumed ends
with exactly the weights (adapter, EMA, optimizer, RNG) of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def tiny_args(out: Path, stitch: str, steps: int) -> list[str]:
    """2 prompts x 4 samples, 6 sampler steps (SDE at steps 0-1, stops at 2..4), 6 training prompts."""
    return [f"out={out}", f"train.steps={steps}", f"reward.stitches=[{stitch}]", "rollout.prompts_per_iteration=2",
            "rollout.group_size=4", "train.micro_batch=3", "sampler.steps=6", "rollout.stop_window=[2,4]",
            "rollout.tau_per=sample", "grpo.sde_window=[0,2]", "grpo.timesteps_per_sample=1", "grpo.clip_range=0.2",
            "train.lr=1e-2", "data.num_prompts=6", "eval.num_prompts=4", "eval.every=0", "eval.grid=0",
            "log.wandb=false", "log.progress=false", "lora.rank=4"]


@pytest.mark.slow
def test_grpo_ratio_is_one_and_resume_is_exact(random_world, random_stitches, ray_local, tmp_path):
    from grpo_sd35 import main

    stitch = random_stitches["tiny-sd3"]
    straight = main(tiny_args(tmp_path / "straight", stitch, steps=3))
    assert straight["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["train/logp_abs_diff_max"] for r in rows if "train/logp_abs_diff_max" in r]
    assert diffs == [0.0, 0.0, 0.0]  # the ratio is exactly 1 at every iteration's first update
    assert all(r["train/tau_max"] > 0 for r in rows if "train/tau_max" in r)  # stopped early (mode=stitch)

    main(tiny_args(tmp_path / "resumed", stitch, steps=1))  # stops after 1 step (final checkpoint)
    second = main(tiny_args(tmp_path / "resumed", stitch, steps=3))  # resumes at step 1
    assert second["steps"] == 3 and second["iterations"] == 3
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-3" / "state.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-3" / "state.safetensors")
    assert a.keys() == b.keys() and {"policy", "ema", "learner0", "rng"} <= {k.split(".")[0] for k in a}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    policy = [k for k in a if k.startswith("policy.") and "lora_B" in k]
    assert policy and any(a[k].abs().sum() > 0 for k in policy)  # the adapters did train
