"""Stage 2 of the stitch build under Ray Train (SPEC §4): data-parallel DeepSpeed ZeRO finetune of a StitchVM.

Every worker loads the frozen models and the closed-form artifact (verified against them), caches the teacher
targets of its own slice of the finetune images and trains the stitch + reward tail with the core loss
(rlstitch.stitch.finetune.batch_loss) through `deepspeed.initialize` (ZeRO-2 by default; gloo on CPU with
DS_ACCELERATOR=cpu, NCCL on GPU). Checkpoints go through `ray.train.report` (DeepSpeed's model / partitioned
optimizer files plus each rank's data RNG, step and history), and a restarted or re-run job resumes from the
latest one. Rank 0 writes the final artifact in the StitchVM format.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlstitch.train.ds_config import deepspeed_config

RUN_NAME = "finetune"  # Ray Train run under <out>/ray_train: the same out resumes the same run
DS_TAG = "ds"  # DeepSpeed's checkpoint tag inside each reported checkpoint
STATE_FILE = "train_state.json"


@dataclass
class FinetuneJob:
    """Everything a Ray Train worker needs (plain data: the recipe's config classes stay on the driver)."""

    out: str  # absolute artifact folder (shared storage on a multi-node cluster)
    closed_form: str  # the closed-form artifact that initialises the student
    models: dict  # backbone / backbone_path / reward / reward_path
    data: str  # Parquet folder with train*.parquet and val*.parquet
    finetune: dict  # FinetuneConfig fields
    zero_stage: int = 2
    bf16: bool = False
    threads: int = 1
    env: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)  # extra manifest fields of the final artifact (fit, config)


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows [a, b) of n that a rank owns."""
    return rank * n // world, (rank + 1) * n // world


def rank_targets(job: FinetuneJob, cfg, reward, codec, rank: int, world: int):
    """Teacher targets of this rank's slice of the train images, and (rank 0) of the validation images."""
    from rlstitch.data.parquet import read_rows
    from rlstitch.stitch.finetune import teacher_targets

    a, b = rank_slice(cfg.train_images, rank, world)
    train = teacher_targets(reward, codec, read_rows(job.data, "train", a, b)[0])
    val = None
    if rank == 0:  # only rank 0 logs the validation loss
        val = teacher_targets(reward, codec, read_rows(job.data, "val", 0, cfg.val_images)[0])
    return train, val


def save_state(d: Path, engine, g: torch.Generator, rank: int, step: int, history: list) -> None:
    """DeepSpeed's files (collective), this rank's data RNG, and on rank 0 the step and history."""
    from safetensors.torch import save_file

    engine.save_checkpoint(str(d), tag=DS_TAG)
    save_file({"data": g.get_state()}, str(d / f"rng-rank{rank}.safetensors"))
    if rank == 0:
        (d / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))


def restore_state(engine, g: torch.Generator, rank: int, world: int) -> tuple[int, list]:
    """(start step, history) from the latest reported checkpoint, or (0, []) on a fresh run."""
    import ray.train
    from safetensors.torch import load_file

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        d = Path(d)
        writers = len(list(d.glob("rng-rank*.safetensors")))
        if writers != world:  # ZeRO partitions the optimizer state by rank
            raise RuntimeError(f"checkpoint {d} was written by {writers} learners, this run has {world}: "
                               f"resume with learner.num_workers={writers}, or start afresh with a new out=")
        rng = d / f"rng-rank{rank}.safetensors"
        engine.load_checkpoint(str(d), tag=DS_TAG)
        g.set_state(load_file(str(rng))["data"])
        info = json.loads((d / STATE_FILE).read_text())
    print(f"[finetune rank {rank}] resumed from step {info['step']} ({d.name})")
    return int(info["step"]), list(info["history"])


def mean_across_ranks(x: float) -> float:
    """The mean of a scalar over the data-parallel ranks (for logging)."""
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def report(engine, g, rank: int, step: int, history: list, metrics: dict, checkpoint: bool) -> None:
    """ray.train.report on every rank (a barrier), with a checkpoint folder when asked."""
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="stitch-ckpt-") as d:
        save_state(Path(d), engine, g, rank, step, history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop(config: dict) -> None:
    """The per-worker loop of the TorchTrainer."""
    job = FinetuneJob(**config)
    os.environ.update(job.env)  # DS_ACCELERATOR must be set before deepspeed is imported
    import deepspeed
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    from actors.metrics import record
    from rlstitch.stitch import artifact
    from rlstitch.stitch.build import StitchBuildConfig, load_models
    from rlstitch.stitch.finetune import FinetuneConfig, batch_loss, make_optimizer, set_lr, validation_loss

    if job.threads:
        torch.set_num_threads(job.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))  # DeepSpeed reads these
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    cfg = FinetuneConfig(**job.finetune)
    device = ray.train.torch.get_device()
    # Every model on this worker's device: the teacher (reward, codec) makes the targets there too.
    backbone, reward, codec = load_models(StitchBuildConfig(**job.models), device)
    vm = artifact.load(job.closed_form, backbone, reward)
    train, val = rank_targets(job, cfg, reward, codec, rank, world)
    micro = cfg.batch // world
    # DeepSpeed wraps only the trained modules: the frozen backbone and reward are identical on every rank, so
    # they need no broadcast (DeepSpeed's cannot send 0-d parameters such as CLIP's logit_scale anyway).
    trained = torch.nn.ModuleDict(vm.trainable_modules())
    engine, opt, _, _ = deepspeed.initialize(model=trained, optimizer=make_optimizer(vm, cfg),
                                             config=deepspeed_config(micro, 1, world, job.zero_stage, job.bf16),  # no accumulation
                                             dist_init_required=False)
    g = torch.Generator().manual_seed(cfg.seed + 7919 * rank)  # a different data stream per rank
    start, history = restore_state(engine, g, rank, world)
    vm.train()
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="finetune (ray train)", initial=start, total=cfg.steps,
               disable=rank != 0)
    for step in bar:
        set_lr(opt, step, cfg)
        loss = batch_loss(vm, reward, train, cfg, g, micro)
        engine.backward(loss)
        engine.step()
        done = step + 1
        evaluate = done % cfg.eval_every == 0 or done == cfg.steps
        save = done % cfg.ckpt_every == 0 or done == cfg.steps
        if not (evaluate or save):
            continue
        rec = {"step": done, "train_loss": mean_across_ranks(float(loss.detach())),
               "seconds": round(time.time() - t0, 1)}
        if evaluate and rank == 0:
            vm.eval()
            rec["val_loss"] = validation_loss(vm, reward, val, cfg)
            vm.train()
            record("rlstitch_finetune_loss", rec["train_loss"], job.tags)
            bar.set_postfix(loss=f"{rec['train_loss']:.4f}", val=f"{rec['val_loss']:.4f}")
        if evaluate:
            history.append(rec)
        report(engine, g, rank, done, history, rec, save)
    vm.eval()
    if rank == 0:
        artifact.save(vm, job.out, finetuned=True, history=history,
                      finetune_seconds=round(time.time() - t0, 1), **job.manifest)
        print(f"[finetune] StitchVM written to {job.out}")


def run_finetune(job: FinetuneJob, learner, storage: str | Path):
    """Launch the TorchTrainer for `job` with the learner role's placement; returns the Ray Train Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.group import scaling_config

    gpu = learner.num_gpus > 0
    backend = learner.backend if learner.backend != "auto" else ("nccl" if gpu else "gloo")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(job),
        scaling_config=scaling_config(learner, "learner"),
        torch_config=TorchConfig(backend=backend, timeout_s=int(learner.collective_timeout_s)),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=str(Path(storage).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=learner.keep_checkpoints),
            failure_config=FailureConfig(max_failures=learner.max_failures),
            worker_runtime_env={"env_vars": job.env},
        ),
    )
    return trainer.fit()
