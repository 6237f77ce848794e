"""The one DeepSpeed config builder, shared by the policy learner (rlstitch/train/learner.py DeepSpeedEngine) and
the StitchVM finetune (actors/stitch_finetune.py)."""

from __future__ import annotations


def deepspeed_config(micro: int, gas: int, world_size: int, zero_stage: int, bf16: bool,
                     grad_clip: float | None = None, backend: str | None = None) -> dict:
    """`micro` samples per rank and micro-step, `gas` micro-steps per optimizer step, ZeRO `zero_stage`, bf16 or
    fp32; gradient clipping when grad_clip is given; with a `backend` ("gloo" / "nccl") ZeRO's communication
    knobs are set for it (gloo has no reduce-scatter: ZeRO falls back to all-reduce on CPU)."""
    zero = {"stage": zero_stage}
    if zero_stage and backend is not None:
        zero |= {"reduce_scatter": backend == "nccl", "overlap_comm": backend == "nccl", "contiguous_gradients": True}
    config = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size, "zero_optimization": zero, "bf16": {"enabled": bf16},
        # custom optimizers (the learner's AdamW, the finetune's two groups): DeepSpeed only vouches for its own
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9, "wall_clock_breakdown": False,  # progress and timing are ours
    }
    if grad_clip is not None:
        config["gradient_clipping"] = grad_clip
    return config
