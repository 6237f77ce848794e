"""recipes/nft_flux.py on Ray + DeepSpeed: a run stopped after N steps and resumed ends with exactly the weights
(adapters, old policy, EMA, optimizer) of an uninterrupted run, also with pipelined (async) iterations."""

from __future__ import annotations

import json
import shutil
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


def final_state(out: Path, step: int) -> dict:
    """The checkpointed tensors of a run at `step` (adapters, old policy, EMA, optimizer, RNG)."""
    return load_file(out / "checkpoints" / f"step-{step}" / "state.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit-for-bit equal learner state (extra tensors of in-flight weights aside)."""
    keys = {k for k in a if not k.startswith("sampled-")}
    assert keys == {k for k in b if not k.startswith("sampled-")}
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def ledger(out: Path) -> list[dict]:
    """The draws that reached the learner, in order."""
    from dataclasses import asdict

    from actors.trainer.state import read_ledger

    return [asdict(row) for row in read_ledger(out / "ledger.jsonl")]


def sequential(argv: list[str]) -> None:
    """The synchronous NFT loop as it was before the pipeline, step by step on the driver's primitives."""
    from actors.trainer.loop import due, open_run
    from actors.trainer.report import evaluate
    from actors.trainer.state import draw_batch, save
    from actors.trainer.world import publish
    from rlstitch.train.algorithms import NFT

    cfg, state, world, evals = open_run("nft_flux", argv)
    try:
        while state.iteration < cfg.iterations:
            prompts, seeds, stops = draw_batch(cfg, state)
            roll = world.rollouts.collect(world.rollouts.submit("sample", prompts, seeds, stops), state.version)
            reward, _ = world.scorer.value(roll["z"], roll["tau"], prompts)
            stats = world.learner.update(NFT.batch(cfg, roll, reward, prompts))
            state.iteration, state.version = state.iteration + 1, int(stats["step"])
            publish(world, state.version)
            if due(cfg.eval.every, state.iteration, cfg.iterations):
                evaluate(world, state, *evals)
            if due(cfg.checkpoint.every, state.iteration, cfg.iterations):
                save(world, state)
    finally:
        world.shutdown()


@pytest.mark.slow
def test_staleness_0_is_the_sequential_loop(random_world, random_stitches, ray_local, tmp_path):
    """The pipelined loop at staleness 0 trains to exactly the weights of the plain sequential loop."""
    from nft_flux import main

    stitch = random_stitches["tiny-flux"]
    sequential(tiny_args(tmp_path / "sequential", stitch, steps=3))
    main(tiny_args(tmp_path / "pipelined", stitch, steps=3) + ["train.async_staleness=0"])
    assert_same_weights(final_state(tmp_path / "sequential", 3), final_state(tmp_path / "pipelined", 3))
    assert [d["version"] for d in ledger(tmp_path / "pipelined")] == [0, 1, 2]  # on-policy: sampled with the latest


@pytest.mark.slow
def test_async_run_trains_every_draw_once_and_resumes_exactly(random_world, random_stitches, ray_local, tmp_path):
    """Staleness 1: every prompt/seed the run draws reaches the learner exactly once, sampled with the weights of one
    iteration earlier; a run resumed from a checkpoint taken while a draw was in flight ends with the uninterrupted
    run's weights bit for bit."""
    from nft_flux import main

    from actors.trainer.state import draw_batch, new_state
    from actors.trainer.world import parse

    stitch = random_stitches["tiny-flux"]
    args = tiny_args(tmp_path / "straight", stitch, steps=4) + ["train.async_staleness=1", "checkpoint.every=2",
                                                                "checkpoint.keep=0"]
    main(args)
    lines = ledger(tmp_path / "straight")
    cfg = parse("nft_flux", args)
    state = new_state(cfg)
    drawn = [draw_batch(cfg, state) for _ in range(4)]  # the run's RNG and prompt stream, replayed without Ray
    assert [(d["prompts"], d["seeds"]) for d in lines] == [(p, s) for p, s, _ in drawn]
    assert [d["version"] for d in lines] == [0, 0, 1, 2]  # iteration n sampled with the weights after n - 2
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/staleness_mean"] for m in metrics if "train/staleness_mean" in m] == [0.0, 1.0, 1.0, 1.0]

    info = json.loads((tmp_path / "straight" / "checkpoints" / "step-2" / "info.json").read_text())
    assert [(d["iteration"], d["version"]) for d in info["in_flight"]] == [(2, 1)]  # drawn, not yet trained on
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)  # a run stopped right after its step-2 checkpoint
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    second = main([a.replace("straight", "resumed") for a in args])
    assert second["steps"] == 4
    drop = lambda rows: [{k: v for k, v in r.items() if k != "learned"} for r in rows]  # noqa: E731 - wall times
    assert drop(ledger(tmp_path / "resumed")) == drop(lines[2:])
    assert_same_weights(final_state(tmp_path / "straight", 4), final_state(tmp_path / "resumed", 4))
