"""The terminal reward behind the value-estimator interface, and weighted sums of several rewards.

`CleanReward` is r(D(z_0)) as `value(z, t=0, prompts)`, so a value actor can host the baseline's training
reward and the clean evaluation reward next to StitchVM. It pickles as its registry names (never its
weights): a Ray actor handed one rebuilds it from the registry, on its own GPU when it has one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlstitch.value.base import ValueEstimator, check_latent, check_prompts


class CleanReward(ValueEstimator):
    """r(D(z_0)) for clean latents (t must be 0): the decoder and the reward model, differentiable in z."""

    name = "clean_reward"

    def __init__(self, codec, reward, names: tuple | None = None):
        super().__init__(reward)
        self.codec = codec
        self.latent_channels = codec.latent_channels
        self._names = names

    @classmethod
    def from_registry(cls, codec: str, codec_path: str | None, reward: str, reward_path: str | None,
                      tiny_dir: str | None = None, device: str = "auto") -> CleanReward:
        """Load the codec and reward by registry name (device auto: cuda when this process sees a GPU)."""
        from rlstitch.models.registry import load_codec, load_reward, resolve_device

        dev = resolve_device(device, "reward device")
        names = (codec, codec_path, reward, reward_path, tiny_dir, device)
        return cls(load_codec(codec, codec_path, device=dev, tiny_dir=tiny_dir),
                   load_reward(reward, reward_path, device=dev, tiny_dir=tiny_dir), names).eval()

    def __reduce__(self):
        """Ship the registry names, not the weights (only registry-built instances can be pickled)."""
        if self._names is None:
            raise TypeError("CleanReward built from objects cannot be pickled; use CleanReward.from_registry")
        return (CleanReward.from_registry, self._names)

    def value(self, z: Tensor, t: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        """The reward of the decoded latents [B]."""
        t = check_latent(z, t, self.latent_channels, self.name)
        if bool((t != 0).any()):
            raise ValueError(f"{self.name}: scores clean latents only (t=0), got t={t.tolist()}")
        check_prompts(prompts, z.shape[0], self.name)
        return self.reward.score(self.codec.decode(z), prompts)


def weighted_sum(parts: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k w_k x_k over named parts (rewards, values or their gradients)."""
    if set(parts) != set(weights):
        raise KeyError(f"parts {sorted(parts)} do not match weights {sorted(weights)}")
    return sum(float(weights[k]) * parts[k].float() for k in parts)


class LazyCleanReward:
    """Stands for a CleanReward by registry names; it unpickles (e.g. inside a value actor) as the real one."""

    def __init__(self, codec: str, codec_path: str | None, reward: str, reward_path: str | None,
                 tiny_dir: str | None = None, device: str = "auto"):
        self.names = (codec, codec_path, reward, reward_path, tiny_dir, device)

    def __reduce__(self):
        return (CleanReward.from_registry, self.names)

    def build(self) -> CleanReward:
        """The real estimator, in this process."""
        return CleanReward.from_registry(*self.names)


class Scorer:
    """A weighted sum of value sources, each with `value(requests)` / `value_and_grad(requests)` (ValueClient,
    ValueActor), and `value_of(roll, prompts)` / `result(pending)` (ValueClient) for scores started while other
    rollouts still run: one request per source per call, per-source results kept for logging."""

    def __init__(self, sources: dict, weights: dict[str, float], ops: dict[str, tuple[tuple, tuple]] | None = None):
        if set(sources) != set(weights):
            raise KeyError(f"sources {sorted(sources)} do not match weights {sorted(weights)}")
        self.sources, self.weights = dict(sources), dict(weights)
        # name -> (ops of a forward, ops of a backward) per scored row, for the compute accounting
        self.ops = dict(ops or {})

    def work(self, rows: int, grad: bool = False) -> dict[str, float]:
        """The counted work of scoring `rows` latents with every source (and back-propagating, with grad)."""
        out: dict[str, float] = {}
        for fwd, bwd in self.ops.values():
            for op in (*fwd, *(bwd if grad else ())):
                out[op] = out.get(op, 0.0) + rows
        return out

    def value(self, z: Tensor, t: Tensor | float, prompts: Sequence[str] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total [B], {name: value [B]})."""
        req = [{"z": z, "t": t, "prompts": None if prompts is None else list(prompts)}]
        parts = {k: s.value(req)[0].float() for k, s in self.sources.items()}
        return weighted_sum(parts, self.weights), parts

    def start(self, roll, prompts: Sequence[str] | None) -> dict:
        """Start every source on one rollout result (or its pending object ref): {name: pending}, for `finish`."""
        return {k: s.value_of(roll, prompts) for k, s in self.sources.items()}

    def finish(self, started: Sequence[dict]) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total [B], {name: value [B]}) of started rollout pieces, concatenated in order."""
        parts = {k: torch.cat([s.result(p[k]).float() for p in started]) for k, s in self.sources.items()}
        return weighted_sum(parts, self.weights), parts

    def value_and_grad(self, z: Tensor, t: Tensor | float,
                       prompts: Sequence[str] | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(weighted total [B], its gradient in z, {name: value [B]})."""
        req = [{"z": z, "t": t, "prompts": None if prompts is None else list(prompts)}]
        out = {k: s.value_and_grad(req)[0] for k, s in self.sources.items()}
        parts = {k: v.float() for k, (v, _) in out.items()}
        grad = weighted_sum({k: g for k, (_, g) in out.items()}, self.weights)
        return weighted_sum(parts, self.weights), grad, parts
