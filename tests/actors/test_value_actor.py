"""Value actors: batching equals separate calls, bad-input errors keep the actor serving, pool balancing, Serve."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from actors.value import Balancer, ValueActor, ValueSpec, as_spec

PROMPTS = ["a red circle", "a blue square", "a small green triangle"]


@pytest.fixture(scope="module")
def tweedie_actor(random_world):
    """An in-process value actor hosting Tweedie on the random world."""
    return ValueActor(ValueSpec(kind="tweedie", tiny_dir=str(random_world)))


def requests_of(sizes, seed=0):
    """Requests with per-request batch sizes, scalar and per-sample t."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        t = 0.3 + 0.1 * k if k % 2 == 0 else torch.rand(n, generator=g)
        out.append({"z": torch.randn(n, 4, 8, 8, generator=g), "t": t, "prompts": [PROMPTS[(k + i) % 3] for i in range(n)]})
    return out


def test_batched_values_equal_separate_calls(tweedie_actor):
    reqs = requests_of([2, 1, 3])
    together = tweedie_actor.value(reqs)
    alone = [tweedie_actor.value([r])[0] for r in reqs]
    assert [v.shape for v in together] == [(2,), (1,), (3,)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    calls = tweedie_actor.info()["calls"]
    tweedie_actor.value(reqs)
    assert tweedie_actor.info()["calls"] == calls + 1  # one forward for the whole list


def test_batched_gradients_equal_separate_calls(tweedie_actor):
    reqs = requests_of([1, 2], seed=1)
    together = tweedie_actor.value_and_grad(reqs)
    for (v, g), r in zip(together, reqs):
        v1, g1 = tweedie_actor.value_and_grad([r])[0]
        assert g.shape == r["z"].shape and g.abs().sum() > 0
        torch.testing.assert_close(v, v1, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g, g1, atol=1e-5, rtol=1e-3)


BAD = [
    ({"z": torch.randn(2, 3, 8, 8), "t": 0.5, "prompts": PROMPTS[:2]}, r"request 0: latent must be \[B, 4, H, W\]"),
    ({"z": torch.randn(8, 8), "t": 0.5, "prompts": PROMPTS[:2]}, r"latent must be \[B, 4, H, W\], got \(8, 8\)"),
    ({"z": torch.ones(1, 4, 8, 8, dtype=torch.int64), "t": 0.5, "prompts": PROMPTS[:1]}, "floating point"),
    ({"z": torch.full((1, 4, 8, 8), float("inf")), "t": 0.5, "prompts": PROMPTS[:1]}, "NaN or Inf"),
    ({"z": torch.full((1, 4, 8, 8), float("nan")), "t": 0.5, "prompts": PROMPTS[:1]}, "NaN or Inf"),
    ({"z": torch.randn(1, 4, 8, 8), "t": 1.5, "prompts": PROMPTS[:1]}, r"t must lie in \[0, 1\]"),
    ({"z": torch.randn(2, 4, 8, 8), "t": [0.1, -0.2], "prompts": PROMPTS[:2]}, r"t must lie in \[0, 1\]"),
    ({"z": torch.randn(2, 4, 8, 8), "t": [0.1, 0.2, 0.3], "prompts": PROMPTS[:2]}, "t must be a scalar or shape"),
    ({"z": torch.randn(2, 4, 8, 8), "t": 0.5, "prompts": PROMPTS}, "got 3 prompts for a batch of 2"),
    ({"z": torch.randn(2, 4, 8, 8), "t": 0.5}, "needs one prompt per latent"),
    ({"z": torch.randn(2, 4, 8, 8), "t": 0.5, "prompts": 5}, "prompts must be a list of strings"),
    ({"z": torch.randn(1, 4, 8, 8), "time": 0.5}, "keys must be z, t"),
    ("not a dict", "must be a dict"),
]


@pytest.mark.parametrize(("req", "msg"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_a_clear_error_and_the_actor_keeps_serving(tweedie_actor, req, msg):
    errors = tweedie_actor.info()["errors"]
    with pytest.raises(ValueError, match=msg):
        tweedie_actor.value([req])
    with pytest.raises(ValueError, match=msg):  # Serve's check before a request joins a batch
        tweedie_actor.check(req)
    assert tweedie_actor.info()["errors"] == errors + 2
    assert tweedie_actor.value(requests_of([1]))[0].shape == (1,)


def test_bad_request_is_named_in_a_list_and_half_precision_is_accepted(tweedie_actor):
    good = requests_of([1])[0]
    with pytest.raises(ValueError, match="value request 1: .*NaN or Inf"):
        tweedie_actor.value([good, {**good, "z": good["z"] * float("nan")}])
    with pytest.raises(ValueError, match="list of dicts"):
        tweedie_actor.value(good)
    half = tweedie_actor.value([{**good, "z": good["z"].half()}])[0]
    torch.testing.assert_close(half, tweedie_actor.value([good])[0], atol=2e-2, rtol=0)
    assert tweedie_actor.value([]) == []


class AnySize(torch.nn.Module):
    """A prompt-free stand-in estimator of any latent size, V = scale * mean(z) + t; like the tiny SD3 it fails on
    latents wider than 8 and on empty batches, and it counts its forwards."""

    latent_channels = 4

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.reward = SimpleNamespace(kind="aesthetic", name="stub")
        self.forwards = 0

    def value(self, z, t, prompts=None):
        self.forwards += 1
        if len(z) == 0:
            raise RuntimeError("cannot reshape tensor of 0 elements")
        if z.shape[-1] > 8:
            raise ValueError(f"Width ({z.shape[-1]}) cannot be greater than `pos_embed_max_size`: 8.")
        return self.scale * z.flatten(1).mean(1) + t

    def value_and_grad(self, z, t, prompts=None):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            v = self.value(z, t, prompts)
            (g,) = torch.autograd.grad(v.sum(), z)
        return v.detach(), g


def any_size_actor() -> ValueActor:
    return ValueActor(ValueSpec(kind="tweedie"), estimator=AnySize())


def test_requests_of_different_latent_sizes_are_answered_in_order():
    actor = any_size_actor()
    reqs = [{"z": torch.randn(2, 4, 8, 8), "t": 0.2}, {"z": torch.randn(1, 4, 4, 6), "t": [0.7]},
            {"z": torch.randn(3, 4, 8, 8), "t": 0.9}]
    together = actor.value(reqs)
    assert actor.model.forwards == 2  # one forward per latent size
    for v, r in zip(together, reqs):
        torch.testing.assert_close(v, actor.value([r])[0])
    for (v, g), r in zip(actor.value_and_grad(reqs), reqs):
        assert v.shape == (len(r["z"]),) and g.shape == r["z"].shape
        torch.testing.assert_close(g, torch.full_like(r["z"], 1 / r["z"][0].numel()))


def test_requests_without_latents_get_empty_results(tweedie_actor):
    empty = {"z": torch.randn(0, 4, 8, 8), "t": 0.5, "prompts": []}
    (v,) = tweedie_actor.value([empty])
    assert v.shape == (0,)
    ((v, g),) = tweedie_actor.value_and_grad([empty])
    assert v.shape == (0,) and g.shape == (0, 4, 8, 8)
    one = requests_of([1])[0]
    v0, v1 = tweedie_actor.value([empty, one])
    assert v0.shape == (0,) and v1.shape == (1,)


def test_serve_batch_keeps_a_failing_request_from_other_callers():
    """A request that fails inside the batched forward fails alone; the others in its batch get their values."""
    import asyncio

    from actors.serve import ValueDeployment, _result

    cls = ValueDeployment.func_or_class
    dep = cls.__new__(cls)  # no Serve replica: call the functions @serve.batch hands the joined requests to
    dep.actor = any_size_actor()
    reqs = [{"z": torch.randn(1, 4, 8, 8), "t": 0.5}, {"z": torch.randn(1, 4, 8, 16), "t": 0.5},
            {"z": torch.randn(2, 4, 8, 8), "t": 0.1}]
    want = dep.actor.value([reqs[0], reqs[2]])
    for name in ("_value_batch", "_grad_batch"):
        good0, bad, good2 = asyncio.run(getattr(cls, name).__wrapped__(dep, reqs))
        with pytest.raises(ValueError, match="pos_embed_max_size"):
            _result(bad)
        got = (good0, good2) if name == "_value_batch" else (good0[0], good2[0])
        for a, b in zip(got, want):
            torch.testing.assert_close(_result(a), b)


def test_spec_validation():
    with pytest.raises(ValueError, match="value.kind='clip' is not one of"):
        as_spec({"kind": "clip"})
    with pytest.raises(TypeError):
        as_spec({"stich": "x"})
    assert as_spec(None).stitch_name == "tiny-sd3_tiny-clip"


def test_balancer_policies():
    rr = Balancer(3, "round_robin")
    assert [rr.pick([5, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    ll = Balancer(3, "least_loaded")
    assert ll.pick([2, 0, 1]) == 1
    assert ll.pick([2, 1, 1]) == 2  # tie between 1 and 2: rotation continues after the last pick
    assert [ll.pick([0, 0, 0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="balance policy 'random'"):
        Balancer(2, "random")


# --------------------------------------------------------------------------------------------- Ray


SMALL_BUILD = ["probe_images=64", "batch=32", "j_max=2", "finetune.steps=4", "finetune.batch=8",
               "finetune.train_images=32", "finetune.val_images=8", "finetune.eval_every=2", "finetune.ckpt_every=2",
               "finetune.warmup=1"]


@pytest.fixture(scope="module")
def stitch_spec(random_world, tmp_path_factory):
    """A small StitchVM artifact on the random world, as a ValueSpec."""
    from rlstitch.stitch.build import main

    out = tmp_path_factory.mktemp("stitch")
    main([*SMALL_BUILD, f"out={out}"])
    return ValueSpec(kind="stitchvm", stitch=str(out), tiny_dir=str(random_world))


WAIT = 600  # seconds: actor start-up (imports, model loading) is slow on a loaded 2-core machine


@pytest.mark.slow
def test_pool_serves_stitchvm_batches_and_survives_bad_input(ray_local, stitch_spec):
    from actors.value import ValueActorPool
    from rlstitch.placement import RoleSpec

    local = ValueActor(stitch_spec)
    pool = ValueActorPool(stitch_spec, RoleSpec(num_workers=2, num_cpus=0.5, custom_resources={"value": 1}),
                          policy="round_robin", tags={"recipe": "test"})
    try:
        reqs = requests_of([2, 3])
        for a, b in zip(pool.value(reqs, timeout=WAIT), local.value(reqs)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        (v, g), = pool.value_and_grad(reqs[:1], timeout=WAIT)
        torch.testing.assert_close(g, local.value_and_grad(reqs[:1])[0][1], atol=1e-5, rtol=1e-3)
        with pytest.raises(ValueError, match="latent must be"):  # a 16x16 latent does not fit the 8x8 stitch
            pool.value([{"z": torch.randn(1, 4, 16, 16), "t": 0.5, "prompts": PROMPTS[:1]}], timeout=WAIT)
        assert pool.value(reqs[:1], timeout=WAIT)[0].shape == (2,)
        info = pool.info()
        assert [i["rank"] for i in info] == [0, 1] and sum(i["errors"] for i in info) == 1
        assert sum(i["calls"] for i in info) == 3 and all(i["calls"] >= 1 for i in info)  # round-robin spread
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_least_loaded_avoids_a_busy_actor(ray_local):
    import ray

    from actors.value import ValueClient

    @ray.remote(num_cpus=0)
    class Sleepy:
        def value(self, requests):
            time.sleep(requests[0]["sleep"])
            return [requests[0]["sleep"]]

    handles = [Sleepy.remote(), Sleepy.remote()]
    try:
        ray.get([h.value.remote([{"sleep": 0.0}]) for h in handles], timeout=WAIT)  # both started
        client = ValueClient(handles, "least_loaded")
        busy, ref = client.submit("value", [{"sleep": 5.0}])
        quick = []
        for _ in range(3):
            k, r = client.submit("value", [{"sleep": 0.0}])
            ray.get(r, timeout=WAIT)
            quick.append(k)
        assert busy == 0 and quick == [1, 1, 1]
        rr = ValueClient(handles, "round_robin")
        assert [rr.submit("value", [{"sleep": 0.0}])[0] for _ in range(3)] == [0, 1, 0]
        ray.get(ref, timeout=WAIT)
    finally:
        for h in handles:
            ray.kill(h)


@pytest.mark.slow
def test_serve_deployment_batches_requests_by_handle(ray_local, stitch_spec):
    from ray import serve

    from actors.serve import serve_value
    from rlstitch.placement import RoleSpec

    handle = serve_value(stitch_spec, name="value_test", role=RoleSpec(num_cpus=0.5), max_batch_size=8,
                         batch_wait_timeout_s=0.5, autoscaling={"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1})
    try:
        reqs = requests_of([1, 2, 1, 2], seed=3)
        futures = [handle.value.remote(r) for r in reqs]
        local = ValueActor(stitch_spec).value(reqs)
        for f, b in zip(futures, local):
            torch.testing.assert_close(f.result(timeout_s=WAIT), b, atol=1e-5, rtol=1e-4)
        assert handle.info.remote().result(timeout_s=WAIT)["calls"] < len(reqs)  # dynamic batching joined requests
        with pytest.raises(ValueError, match="t must lie in"):
            handle.value.remote({**reqs[0], "t": 2.0}).result(timeout_s=WAIT)
        v, g = handle.value_and_grad.remote(reqs[1]).result(timeout_s=WAIT)
        assert v.shape == (2,) and g.shape == (2, 4, 8, 8)
        torch.testing.assert_close(v, local[1], atol=1e-5, rtol=1e-4)
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_serve_http_route_on_loopback(ray_local, stitch_spec):
    import urllib.error
    import urllib.request

    from ray import serve

    from actors.serve import serve_value
    from rlstitch.placement import RoleSpec

    port = 18431
    serve_value(stitch_spec, name="value_http", role=RoleSpec(num_cpus=0.5), http_port=port,
                autoscaling={"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1})
    try:
        req = requests_of([2], seed=4)[0]
        body = {"z": req["z"].tolist(), "t": req["t"], "prompts": req["prompts"]}
        post = urllib.request.Request(f"http://127.0.0.1:{port}/value_http", json.dumps(body).encode(),
                                      {"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(post, timeout=WAIT).read())
        assert got["value"] == pytest.approx(ValueActor(stitch_spec).value([req])[0].tolist(), abs=1e-4)
        bad = urllib.request.Request(post.full_url, json.dumps({**body, "t": -1}).encode(), post.headers)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(bad, timeout=WAIT)
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_value_client_waits_time_out_with_a_clear_error(ray_local):
    import pickle

    import ray

    from actors.value import ValueClient

    @ray.remote(num_cpus=0)
    class Stuck:
        def value(self, requests):
            time.sleep(60)

    handle = Stuck.remote()
    try:
        assert ValueClient([handle]).timeout_s is not None  # no wait on a value actor is unbounded by default
        client = ValueClient([handle], timeout_s=0.5)
        assert pickle.loads(pickle.dumps(client)).timeout_s == 0.5  # rollout actors hold copies
        with pytest.raises(TimeoutError, match=r"value actor 0 did not answer 'value' within 0\.5 s"):
            client.value_fn()(torch.zeros(1, 4, 8, 8), 0.5, None)
    finally:
        ray.kill(handle)
