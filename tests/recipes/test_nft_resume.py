"""recipes/nft_flux.py on Ray + DeepSpeed: a run stopped after N steps and resumed ends with exactly the weights
(adapters, old policy, EMA, optimizer) of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def tiny_args(out: Path, stitch: str, steps: int) -> list[str]:
    """The smallest sensible run: 2 prompts x 4 samples, 6 sampler steps, 6 training prompts (epochs roll over)."""
    return [f"out={out}", f"train.steps={steps}", f"reward.stitches=[{stitch}]", "rollout.prompts_per_iteration=2",
            "rollout.group_size=4", "train.micro_batch=8", "sampler.steps=6", "rollout.stop_window=[2,4]",
            "rollout.tau_per=sample", "data.num_prompts=6", "eval.num_prompts=4", "eval.every=0", "eval.grid=0",
            "log.wandb=false", "log.progress=false", "lora.rank=4", "nft.old_decay_rate=0.1"]


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(random_world, random_stitches, ray_local, tmp_path):
    from nft_flux import main

    stitch = random_stitches["tiny-flux"]
    main(tiny_args(tmp_path / "straight", stitch, steps=4))
    first = main(tiny_args(tmp_path / "resumed", stitch, steps=2))  # stops after 2 steps (final checkpoint)
    assert first["steps"] == 2
    second = main(tiny_args(tmp_path / "resumed", stitch, steps=4))  # resumes at step 2
    assert second["steps"] == 4 and second["iterations"] == 4

    a = load_file(tmp_path / "straight" / "checkpoints" / "step-4" / "state.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-4" / "state.safetensors")
    assert a.keys() == b.keys()
    groups = {k.split(".")[0] for k in a}
    assert {"policy", "old", "ema", "learner0", "rng"} <= groups
    for k in a:
        assert torch.equal(a[k], b[k]), k
    policy = [k for k in a if k.startswith("policy.") and "lora_B" in k]
    assert policy and any(a[k].abs().sum() > 0 for k in policy)  # the adapters did train
