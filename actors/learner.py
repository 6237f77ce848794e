"""The learner group: data-parallel DeepSpeed (ZeRO-2) workers under Ray Train, driven like a local object.

`TorchTrainer.fit()` runs in a driver thread; each Ray Train worker builds a `rlstitch.train.learner.Learner`
around `deepspeed.initialize` and then serves commands from its own queue ("update", "publish", "state",
"load_state", "stop"), answering on a shared queue. The driver's `LearnerGroup.update(batch)` therefore reads
like a method call, while the process group (gloo on CPU, NCCL on GPU) and DeepSpeed live on the workers.
Every wait has a timeout, and a worker that fails reports its traceback instead of leaving the driver hanging.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import ray
import torch
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.group import scaling_config
from actors.labels import ROLE_ENV, check_rank
from actors.metrics import record
from rlstitch.placement import RoleSpec

COMMANDS = ("update", "publish", "state", "load_state", "stop")


class LearnerLost(RuntimeError):
    """The learner group ended without an answer: a rank's process or node was lost (not an error a rank
    reported). The run can go on from its latest checkpoint (actors/trainer/loop.py restarts it)."""


def _build_learner(cfg, rank: int, world_size: int, value):
    """Policy + DeepSpeed engine + Learner on this Ray Train worker."""
    from ray.train.torch import get_device

    from rlstitch.config import use_bf16
    from rlstitch.models.registry import load_backbone
    from rlstitch.train.algorithms import algorithm
    from rlstitch.train.config import pick_dtype
    from rlstitch.train.learner import DeepSpeedEngine, Learner, accumulation_steps
    from rlstitch.train.policy import Policy

    cuda = torch.cuda.is_available()
    device = get_device() if cuda else torch.device("cpu")
    bf16 = use_bf16(cfg.train.precision, cuda)
    m, lo = cfg.model, cfg.lora
    backbone = load_backbone(m.backbone, m.path, dtype=pick_dtype(m.dtype, cuda), device=device)
    policy = Policy(backbone, lo.enabled, lo.rank, lo.alpha, lo.targets,
                    slots=algorithm(cfg).slots, seed=cfg.train.seed)
    engine = DeepSpeedEngine(policy, policy.trainable_parameters(), cfg, accumulation_steps(cfg, world_size),
                             world_size, bf16, "nccl" if cuda else "gloo")
    value_fn = None
    if value is not None:
        def value_fn(z, t, prompts):
            total, grad, _ = value.value_and_grad(z, t, prompts)
            return total, grad
    return Learner(cfg, policy, engine, rank, world_size, value=value_fn, device=device)


def learner_loop(config: dict) -> None:
    """The Ray Train worker function: build the learner, then serve commands until "stop"."""
    import ray.train

    from rlstitch.train.config import from_dict

    if config.get("tiny_dir"):
        os.environ["RLSTITCH_TINY_DIR"] = config["tiny_dir"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    check_rank(rank)
    inbox, outbox = config["inboxes"][rank], config["outbox"]
    try:
        learner = _build_learner(from_dict(config["cfg"]), rank, world, config.get("value"))
        outbox.put({"rank": rank, "op": "ready", "result": {"device": str(learner.device)}})
    except Exception:
        outbox.put({"rank": rank, "op": "ready", "error": traceback.format_exc()})
        raise
    while True:
        msg = inbox.get()
        op = msg["op"]
        try:
            result = _serve(learner, op, msg, rank)
        except Exception:
            outbox.put({"rank": rank, "op": op, "error": traceback.format_exc()})
            raise
        outbox.put({"rank": rank, "op": op, "result": result})
        if op == "stop":
            return


def _serve(learner, op: str, msg: dict, rank: int):
    """One command on one rank."""
    if op == "update":
        start = time.perf_counter()
        stats = learner.update(ray.get(msg["batch"]))
        return stats | {"learner_step_s": (time.perf_counter() - start) / learner.cfg.train.updates_per_iteration}
    if op == "publish":
        # Every rank holds the same (all-gathered) weights after a step; rank 0 puts them in the object store once
        # and answers with the ref, which every rollout worker then fetches (no copy through the driver).
        if rank:
            return None
        from actors.rollout import weights_payload
        from rlstitch.train.lora import state_bytes

        payload = weights_payload(msg["version"], learner.weights(msg["which"]), msg["slot"],
                                  learner.base_weights() if msg.get("base") else None)
        nbytes = state_bytes(payload["adapter"]) + (state_bytes(payload["base"]) if payload["base"] else 0)
        return {"ref": [ray.put(payload)], "bytes": nbytes}  # in a list: the queue must not resolve the ref
    if op == "state":
        st = learner.state()
        return st if rank == 0 else {"optimizer": st["optimizer"], "optimizer_scalars": st["optimizer_scalars"]}
    if op == "load_state":
        states = ray.get(msg["states"])
        learner.load_state(states[0] | {k: states[rank][k] for k in ("optimizer", "optimizer_scalars")})
        return {"step": learner.steps_done}
    if op == "stop":
        return None
    raise ValueError(f"unknown learner command {op!r}; known: {COMMANDS}")


class LearnerGroup:
    """N learner ranks under one Ray Train TorchTrainer (DeepSpeed ZeRO inside), called from the driver."""

    def __init__(self, cfg, role: RoleSpec, tags: Mapping[str, str], value=None, tiny_dir: str | None = None,
                 storage: str | Path | None = None):
        from ray.train import RunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from rlstitch.config import to_dict

        role.validate("learner")
        self.cfg, self.tags, self.world = cfg, dict(tags), role.num_workers
        self.timeout = cfg.train.timeout_s
        # The queues live on the driver's node: placed anywhere, one could land on a node the autoscaler is about
        # to remove as idle (it holds no role resource), and the run would lose its learner mid-iteration.
        here = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                      soft=False)}
        self.inboxes = [Queue(actor_options=here) for _ in range(self.world)]
        self.outbox = Queue(actor_options=here)
        use_gpu = role.num_gpus > 0
        trainer = TorchTrainer(
            learner_loop,
            train_loop_config={"cfg": to_dict(cfg), "inboxes": self.inboxes, "outbox": self.outbox, "value": value,
                               "tiny_dir": tiny_dir},
            scaling_config=scaling_config(role, "learner"),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(self.timeout)),
            run_config=RunConfig(name=f"learner-{tags.get('run', 'run')}",
                                 storage_path=str(Path(storage or "runs/ray_train").resolve()),
                                 worker_runtime_env={"env_vars": {ROLE_ENV: "learner"}}),  # dashboard label
        )
        self.error: BaseException | None = None
        self._pending = None  # the outbox get that _next_message waits on
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="learner-fit", daemon=True)
        self.thread.start()
        try:
            self.info = self._collect("ready", timeout=max(self.timeout, role.ready_timeout_s))
        except BaseException:  # the caller gets no group to shut down: stop the ranks and free the queues here
            self.shutdown()
            raise

    def _fit(self, trainer) -> None:
        """Run the trainer; remember why it ended if it failed."""
        try:
            trainer.fit()
        except BaseException as e:  # surfaced by the next _collect
            self.error = e

    def _collect(self, op: str, timeout: float | None = None) -> list:
        """One answer per rank to `op`, in rank order; a worker error or a timeout raises with the cause."""
        answers: dict[int, object] = {}
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(answers) < self.world:
            msg = self._next_message(1.0)
            if msg is None and (self.error is not None or not self.thread.is_alive()):
                # the trainer can end (after "stop", or a rank's error) before the last reply reaches the outbox
                msg = self._next_message(5.0)
                if msg is None:
                    why = " ".join(str(self.error).split("\n")[:3]) if self.error else "the trainer thread ended"
                    raise LearnerLost(f"the learner group stopped while waiting for {op!r}: {why}") from self.error
            if msg is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"learner ranks {sorted(set(range(self.world)) - set(answers))} did not answer "
                                       f"{op!r} within {timeout or self.timeout:.0f} s (train.timeout_s)") from None
                continue
            if "error" in msg:
                raise RuntimeError(f"learner rank {msg['rank']} failed in {msg['op']!r}:\n{msg['error']}")
            if msg["op"] == op:
                answers[msg["rank"]] = msg["result"]
        return [answers[k] for k in range(self.world)]

    def _next_message(self, wait_s: float) -> dict | None:
        """The outbox's next message, or None after wait_s seconds. One get stays pending across waits: a queue get
        whose timeout expires raises Empty in the queue actor, and the dashboard counted each such poll as a failed
        task."""
        if self._pending is None:
            self._pending = self.outbox.actor.get.remote()
        if not ray.wait([self._pending], timeout=wait_s)[0]:
            return None
        ref, self._pending = self._pending, None
        return ray.get(ref)

    def _call(self, op: str, **payload) -> list:
        """Send a command to every rank and wait for all answers."""
        for q in self.inboxes:
            q.put({"op": op, **payload})
        return self._collect(op)

    def update(self, batch: dict) -> dict:
        """One iteration's optimizer steps on every rank; rank-averaged statistics ("..._max" ones: the maximum)."""
        results = self._call("update", batch=ray.put(batch))
        # maxima, counted work (summed over ranks) and means
        stats = {k: max(float(r[k]) for r in results) if k.endswith("_max") else
                 sum(float(r.get(k, 0.0)) for r in results) if k.startswith("work/") else
                 sum(float(r[k]) for r in results) / len(results) for k in dict.fromkeys(k for r in results for k in r)}
        stats["step"] = int(results[0]["step"])
        record("rlstitch_learner_step_s", stats["learner_step_s"], self.tags | {"role": "learner"})
        return stats

    def publish(self, which: str, version: int, slot: str = "default", base: bool = False) -> dict:
        """Weights ("sample", "current" or "ema"; with base=True also the frozen base weights) put in the object
        store by rank 0 as a rollout worker's set_weights payload: {"ref", "bytes"}."""
        out = self._call("publish", which=which, version=version, slot=slot, base=base)[0]
        return {"ref": out["ref"][0], "bytes": out["bytes"]}

    def state(self) -> list[dict]:
        """Per-rank checkpoint state (rank 0 carries the weights)."""
        return self._call("state")

    def load_state(self, states: list[dict]) -> None:
        """Restore from `state()` output of the same number of ranks."""
        if len(states) != self.world:
            raise ValueError(f"checkpoint has {len(states)} learner ranks, the group has {self.world}: "
                             f"resume with placement.learner.num_workers={len(states)}")
        self._call("load_state", states=ray.put(states))

    def shutdown(self) -> None:
        """Stop the workers and wait for the trainer to finish."""
        if self.thread.is_alive() and self.error is None:
            try:
                self._call("stop")
            except (RuntimeError, TimeoutError):
                pass
        self.thread.join(timeout=60)
        if self._pending is not None:  # after a failure a get still waits in the outbox actor: end it first
            ray.cancel(self._pending)
        for q in [*self.inboxes, self.outbox]:
            try:
                q.shutdown()
            except Exception:
                pass
