"""Value actors: a value estimator (StitchVM, Tweedie or Monte Carlo) served on Ray with batched requests.

A request is {"z": latents [B, C, H, W], "t": float or [B], "prompts": list of B strings or None}.
`value(requests)` / `value_and_grad(requests)` take a LIST of requests, run them as one batched forward per
latent size and return one result per request, in order. A bad request (shape, dtype, NaN/Inf, t outside [0, 1],
prompt count) raises a ValueError naming the request and the problem to that caller; the actor keeps serving.

- ValueSpec / build_estimator: what an actor hosts, and loading it.
- ValueActor: the plain class (usable in-process; Ray wraps it through ActorGroup).
- ValueActorPool: N actors in one placement group (GPU fractions allowed), round-robin or least-loaded.

Requests are validated and batched by rlstitch.value.requests (Ray-free); actors/serve.py puts the same
ValueActor behind Ray Serve.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import ray
import torch
from torch import Tensor

from actors.group import ActorGroup, get_within
from actors.metrics import record
from rlstitch.models.registry import check_device, resolve_device
from rlstitch.placement import RoleSpec
from rlstitch.value.requests import Batch, batch_requests, split

KINDS = ("stitchvm", "tweedie", "monte_carlo")


@dataclass
class ValueSpec:
    """What a value actor hosts: estimator kind, model names (or local folders) and the stitch artifact."""

    kind: str = "stitchvm"  # stitchvm | tweedie | monte_carlo
    backbone: str = "tiny-sd3"  # registry name
    backbone_path: str | None = None
    reward: str = "tiny-clip"
    reward_path: str | None = None
    stitch: str | None = None  # artifact registry name or folder (default "<backbone>_<reward>")
    codec: str | None = None  # default: the backbone's codec in the registry
    codec_path: str | None = None
    tiny_dir: str | None = None  # a rebuilt tiny world ($RLSTITCH_TINY_DIR inside the actor)
    device: str = "auto"  # auto (cuda when the actor has a GPU) | cpu | cuda
    mc_k: int = 4  # Monte Carlo rollouts per value
    mc_steps: int = 20

    def validate(self) -> None:
        """Clear errors naming the knob."""
        if self.kind not in KINDS:
            raise ValueError(f"value.kind={self.kind!r} is not one of {KINDS}")
        check_device(self.device, "value.device")  # the driver may see no GPU that the actors will have

    @property
    def stitch_name(self) -> str:
        """The artifact to load."""
        return self.stitch or f"{self.backbone}_{self.reward}"


def as_spec(spec: ValueSpec | Mapping | None) -> ValueSpec:
    """A validated ValueSpec from a spec, a dict (as sent to Ray actors) or None (defaults)."""
    spec = spec if isinstance(spec, ValueSpec) else ValueSpec(**dict(spec or {}))
    spec.validate()
    return spec


def pick_device(spec: ValueSpec) -> torch.device:
    """cuda when asked or (auto) when this process sees a GPU, else cpu."""
    return resolve_device(spec.device, "value.device")


def build_estimator(spec: ValueSpec, device: torch.device | str = "cpu"):
    """The value estimator a spec names, frozen and in eval mode."""
    from rlstitch.models.registry import BACKBONES, load_backbone, load_codec, load_reward, stitch_dir
    from rlstitch.stitch import artifact
    from rlstitch.value.estimators import MonteCarlo, Tweedie

    if spec.tiny_dir:
        os.environ["RLSTITCH_TINY_DIR"] = spec.tiny_dir
    # The text encoder is needed even for StitchVM: its null-text condition is what the stitch was built with.
    backbone = load_backbone(spec.backbone, spec.backbone_path, device=device)
    reward = load_reward(spec.reward, spec.reward_path, device=device)
    if spec.kind == "stitchvm":
        return artifact.load(stitch_dir(spec.stitch_name), backbone, reward).to(device).eval()
    codec = load_codec(spec.codec or BACKBONES[spec.backbone].vae, spec.codec_path, device=device)
    if spec.kind == "tweedie":
        return Tweedie(backbone, codec, reward).eval()
    return MonteCarlo(backbone, codec, reward, k=spec.mc_k, steps=spec.mc_steps).eval()


# --------------------------------------------------------------------------------------------- actor


class ValueActor:
    """Hosts one value estimator; batched `value` / `value_and_grad` over lists of requests."""

    def __init__(self, spec: ValueSpec | Mapping | None = None, rank: int = 0, world_size: int = 1,
                 tags: Mapping[str, str] | None = None, estimator=None):
        self.spec = as_spec(spec)
        self.rank, self.world_size = rank, world_size
        self.device = pick_device(self.spec) if estimator is None else next(estimator.parameters()).device
        self.model = estimator if estimator is not None else build_estimator(self.spec, self.device)
        self.tags = {"role": "value", "recipe": "", "run": "", **dict(tags or {})}
        self.calls = self.latents = self.errors = 0

    def check(self, request: Mapping) -> None:
        """Validate one request (a ValueError names the problem; counted like a bad batch)."""
        self._batch([request])

    def value(self, requests: Sequence[Mapping]) -> list[Tensor]:
        """V per request ([B] each, on the CPU), from one batched forward per latent size."""
        return [v for v, _ in self._per_batch(requests, lambda b: (self._forward(b), None))]

    def value_and_grad(self, requests: Sequence[Mapping]) -> list[tuple[Tensor, Tensor]]:
        """(V [B], dV/dz [B, C, H, W]) per request, from one batched forward and backward per latent size."""
        return self._per_batch(requests, lambda b: self.model.value_and_grad(b.z.to(self.device), b.t.to(self.device),
                                                                             b.prompts))

    def value_of(self, roll: Mapping, prompts: Sequence[str] | None) -> Tensor:
        """V of a rollout result at its stops ({"z", "tau"}; sent as an object ref, so the latents come straight
        from the rollout worker's output)."""
        return self.value([{"z": roll["z"], "t": roll["tau"], "prompts": None if prompts is None else list(prompts)}])[0]

    def each(self, method: str, requests: Sequence[Mapping]) -> list:
        """`method` over requests batched; if the batch fails, each request alone, with its exception in place of
        its result (Serve batches requests of different callers: one bad request must not fail the others)."""
        try:
            return getattr(self, method)(requests)
        except Exception:
            if len(requests) == 1:
                raise
        out = []
        for r in requests:
            try:
                out.append(getattr(self, method)([r])[0])
            except Exception as e:
                out.append(e)
        return out

    def info(self) -> dict:
        """Rank, what it hosts and how much it has served."""
        return {"rank": self.rank, "kind": self.spec.kind, "device": str(self.device), "calls": self.calls,
                "latents": self.latents, "errors": self.errors, "latent_channels": self.model.latent_channels}

    def _batch(self, requests) -> list[Batch]:
        """Validated batches (one per latent size); a bad request counts as an error and is raised to its caller."""
        try:
            return batch_requests(requests, self.model)
        except ValueError:
            self.errors += 1
            raise

    def _per_batch(self, requests: Sequence[Mapping], run) -> list[tuple[Tensor, Tensor | None]]:
        """(V, grad or None) per request, in order: `run` once per latent-size batch, timed and recorded."""
        out: list = [None] * len(requests)
        for batch in self._batch(requests):
            if len(batch.z):
                start = time.perf_counter()
                v, g = (None if x is None else x.cpu() for x in run(batch))
                self._record(batch, v, time.perf_counter() - start)
            else:  # only empty requests: nothing to run
                v, g = torch.empty(0), torch.empty_like(batch.z)
            grads = split(g, batch.sizes) if g is not None else [None] * len(batch.sizes)
            for k, pv, pg in zip(batch.index, split(v, batch.sizes), grads):
                out[k] = (pv, pg)
        return out

    @torch.no_grad()
    def _forward(self, batch: Batch) -> Tensor:
        """One forward; Monte Carlo rollouts share a time grid, so they run per distinct t."""
        z, t = batch.z.to(self.device), batch.t.to(self.device)
        if self.spec.kind != "monte_carlo":
            return self.model.value(z, t, batch.prompts)
        out = torch.empty(len(z))
        for tv in torch.unique(t):
            rows = (t == tv).nonzero().flatten()
            prompts = None if batch.prompts is None else [batch.prompts[i] for i in rows.tolist()]
            out[rows.cpu()] = self.model.value(z[rows], t[rows], prompts).float().cpu()
        return out

    def _record(self, batch: Batch, v: Tensor, seconds: float) -> None:
        """Counters and the documented metrics (exported only inside Ray)."""
        self.calls += 1
        self.latents += len(batch.z)
        if not ray.is_initialized():
            return
        record("rlstitch_value_calls_total", 1, self.tags)
        record("rlstitch_value_batch_size", len(batch.z), self.tags)
        record("rlstitch_value_latency_s", seconds, self.tags)
        record("rlstitch_value_mean", float(v.float().mean()), self.tags)


# ---------------------------------------------------------------------------------------------- pool

POLICIES = ("round_robin", "least_loaded")


class Balancer:
    """Picks a worker: round_robin, or least_loaded (fewest requests in flight; ties go round-robin)."""

    def __init__(self, n: int, policy: str = "least_loaded"):
        if policy not in POLICIES:
            raise ValueError(f"balance policy {policy!r} is not one of {POLICIES}")
        if n < 1:
            raise ValueError("a balancer needs at least one worker")
        self.n, self.policy, self.next = n, policy, 0

    def pick(self, loads: Sequence[int]) -> int:
        """The worker for the next request, given each worker's requests in flight."""
        order = [(self.next + k) % self.n for k in range(self.n)]
        k = order[0] if self.policy == "round_robin" else min(order, key=lambda i: loads[i])
        self.next = (k + 1) % self.n
        return k


class ValueClient:
    """Sends request lists to value actors with a balancing policy; picklable (rollout actors hold one).

    Every wait is bounded: `timeout_s` (unless a call passes its own timeout) ends in a TimeoutError naming the actor.
    """

    def __init__(self, handles: Sequence, policy: str = "least_loaded", timeout_s: float = 1800.0):
        self.handles = list(handles)
        self.balancer = Balancer(len(self.handles), policy)
        self.timeout_s = timeout_s
        self.pending: list[list] = [[] for _ in self.handles]

    def __getstate__(self) -> dict:
        """In-flight refs stay with the sender."""
        return {"handles": self.handles, "policy": self.balancer.policy, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["handles"], state["policy"], state.get("timeout_s", 1800.0))

    def loads(self) -> list[int]:
        """Requests still in flight per actor."""
        for k, refs in enumerate(self.pending):
            if refs:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                self.pending[k] = [r for r in refs if r not in done]
        return [len(r) for r in self.pending]

    def submit(self, method: str, requests: Sequence[Mapping]):
        """Start `method` (value or value_and_grad) on the chosen actor; returns (actor index, object ref)."""
        return self._send(method, list(requests))

    def _send(self, method: str, *args):
        """`method`(*args) on the actor the balancer picks; returns (actor index, object ref)."""
        k = self.balancer.pick(self.loads())
        ref = getattr(self.handles[k], method).remote(*args)
        self.pending[k].append(ref)
        return k, ref

    def value_of(self, roll, prompts: Sequence[str] | None):
        """Start V of a rollout result; `roll` may be the object ref of a rollout task, which the actor waits for
        and fetches itself. Returns the object ref of the values (see `result`)."""
        return self._send("value_of", roll, prompts)[1]

    def result(self, ref, timeout: float | None = None, what: str = "a value actor did not answer"):
        """What a started request returned, waited for at most `timeout` (default timeout_s) seconds."""
        return get_within(ref, self.timeout_s if timeout is None else timeout, what, "raise the value client's timeout_s")

    def call(self, method: str, requests: Sequence[Mapping], timeout: float | None = None):
        """`method` on the chosen actor, waited for at most `timeout` (default timeout_s) seconds."""
        k, ref = self.submit(method, requests)
        return self.result(ref, timeout, f"value actor {k} did not answer {method!r}")

    def value(self, requests: Sequence[Mapping], timeout: float | None = None) -> list[Tensor]:
        """Batched values, one per request."""
        return self.call("value", requests, timeout)

    def value_and_grad(self, requests: Sequence[Mapping], timeout: float | None = None) -> list[tuple[Tensor, Tensor]]:
        """Batched (value, gradient) pairs, one per request."""
        return self.call("value_and_grad", requests, timeout)

    def value_fn(self):
        """(z, t, prompts) -> V: the FK-steering interface."""
        return lambda z, t, prompts: self.value([{"z": z, "t": t, "prompts": prompts}])[0]

    def grad_fn(self):
        """(z, t, prompts) -> (V, grad): the DPS interface."""
        return lambda z, t, prompts: self.value_and_grad([{"z": z, "t": t, "prompts": prompts}])[0]


class ValueActorPool:
    """N value actors placed through one ActorGroup (role "value"), load-balanced by a ValueClient; named
    `label`-<rank> on the dashboard (default "value"). `estimator` (e.g. a lazily rebuilt CleanReward) replaces
    the one the spec would build."""

    def __init__(self, spec: ValueSpec | Mapping | None = None, role: RoleSpec | None = None,
                 policy: str = "least_loaded", tags: Mapping[str, str] | None = None, timeout_s: float = 1800.0,
                 label: str | None = None, estimator=None):
        self.spec = as_spec(spec)
        kwargs = {"estimator": estimator} if estimator is not None else {}
        self.group = ActorGroup(ValueActor, role or RoleSpec(), asdict(self.spec), tags=dict(tags or {}), role="value",
                                label=label, **kwargs)
        self.client = ValueClient(self.group.workers, policy, timeout_s)

    def __len__(self) -> int:
        return len(self.group)

    def value(self, requests: Sequence[Mapping], timeout: float | None = None) -> list[Tensor]:
        """Batched values on the chosen actor."""
        return self.client.value(requests, timeout)

    def value_and_grad(self, requests: Sequence[Mapping], timeout: float | None = None) -> list[tuple[Tensor, Tensor]]:
        """Batched (value, gradient) pairs on the chosen actor."""
        return self.client.value_and_grad(requests, timeout)

    def info(self) -> list[dict]:
        """Every actor's info()."""
        return self.group.call("info", timeout=self.client.timeout_s)

    def shutdown(self) -> None:
        """Kill the actors and free their placement group."""
        self.group.shutdown()
