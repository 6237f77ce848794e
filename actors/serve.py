"""Ray Serve for value models: the library entry point for callers outside the recipes.

`serve_value(spec, autoscaling=...)` deploys a ValueActor as a Serve deployment whose `value` / `value_and_grad`
take ONE request each; @serve.batch joins concurrent callers' requests into one batched forward, and a request
that fails fails alone. The recipes use the placement-group pool of actors/value.py instead (a fixed set of
actors the synchronous driver loop balances over); Serve suits many independent callers and autoscaling. An
optional debug HTTP route binds to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from ray import serve
from torch import Tensor

from actors.group import actor_options
from actors.value import ValueActor, ValueSpec, as_spec
from rlstitch.placement import RoleSpec

DEFAULT_AUTOSCALING = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}


@serve.deployment(name="ValueModel", max_ongoing_requests=64)
class ValueDeployment:
    """A value actor behind Ray Serve: single requests in, dynamically batched by @serve.batch."""

    def __init__(self, spec: Mapping, tags: Mapping[str, str] | None = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01):
        self.actor = ValueActor(spec, tags={"role": "value", **dict(tags or {})})
        for method in (self._value_batch, self._grad_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def value(self, request: Mapping) -> Tensor:
        """V of one request; a bad request fails alone, before it joins a batch."""
        self.actor.check(request)
        return _result(await self._value_batch(request))

    async def value_and_grad(self, request: Mapping) -> tuple[Tensor, Tensor]:
        """(V, grad) of one request."""
        self.actor.check(request)
        return _result(await self._grad_batch(request))

    def info(self) -> dict:
        """The hosted actor's info (calls counts batches, latents counts latents)."""
        return self.actor.info()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _value_batch(self, requests: list[Mapping]) -> list[Tensor]:
        # The forward runs in a thread so the event loop keeps queueing the next batch.
        return await asyncio.to_thread(self.actor.each, "value", list(requests))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _grad_batch(self, requests: list[Mapping]) -> list[tuple[Tensor, Tensor]]:
        return await asyncio.to_thread(self.actor.each, "value_and_grad", list(requests))

    async def __call__(self, http_request) -> Any:
        """Debug HTTP route: POST {"z": nested list, "t": ..., "prompts": [...], "grad": false}."""
        from starlette.responses import JSONResponse

        body = await http_request.json()
        try:
            req = {"z": torch.tensor(body["z"], dtype=torch.float32), "t": body["t"], "prompts": body.get("prompts")}
            if body.get("grad"):
                v, g = await self.value_and_grad(req)
                return {"value": v.tolist(), "grad": g.tolist()}
            return {"value": (await self.value(req)).tolist()}
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)


def _result(x):
    """A batched result, or the exception of a request that failed alone (raised to its caller only)."""
    if isinstance(x, Exception):
        raise x
    return x


def serve_value(spec: ValueSpec | Mapping | None = None, *, name: str = "value", role: RoleSpec | None = None,
                autoscaling: Mapping | None = None, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01,
                http_port: int | None = None, tags: Mapping[str, str] | None = None):
    """Deploy the value model on Ray Serve; returns its DeploymentHandle (`handle.value.remote(req).result()`).

    With http_port, also a debug route POST http://127.0.0.1:<port>/<name> (never bound beyond loopback).
    """
    spec = as_spec(spec)
    http = {"host": "127.0.0.1", "port": http_port or 8000}
    serve.start(proxy_location="HeadOnly" if http_port else "Disabled", http_options=http)
    app = ValueDeployment.options(
        autoscaling_config=dict(autoscaling or DEFAULT_AUTOSCALING), ray_actor_options=actor_options(role or RoleSpec()),
    ).bind(asdict(spec), dict(tags or {}), max_batch_size, batch_wait_timeout_s)
    return serve.run(app, name=name, route_prefix=f"/{name}" if http_port else None)
