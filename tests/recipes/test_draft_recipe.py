"""recipes/draft_sd35.py on Ray + DeepSpeed: a tiny run trains, and every logged metric is a finite number."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_single_rollout_iterations_log_finite_metrics(random_world, random_stitches, ray_local, tmp_path):
    from draft_sd35 import main

    # One rollout per iteration: its reward std must be 0, not NaN (a sample std of one value).
    summary = main([f"out={tmp_path}", "train.steps=2", f"reward.stitches=[{random_stitches['tiny-sd3']}]",
                    "rollout.prompts_per_iteration=1", "rollout.group_size=1", "train.micro_batch=1",
                    "sampler.steps=4", "rollout.stop_window=[1,3]", "data.num_prompts=2", "eval.num_prompts=2",
                    "eval.every=0", "eval.grid=0", "log.wandb=false", "log.progress=false", "lora.rank=4"])
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/reward_std" in r]
    assert len(train) == 2 and all(r["train/reward_std"] == 0.0 for r in train)
    bad = {k: v for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
