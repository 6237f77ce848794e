"""Ray-free pieces of the rollout side: the trainable policy (base + LoRA slots), stop times, batched rollouts
that stop each sample at its own step, and a resumable prompt stream.

Vocabulary used in every log line (see `VOCABULARY`): a *step* is one optimizer update of the learner; an
*iteration* is one rollout batch -> scores -> `updates_per_iteration` steps -> weight sync; an *epoch* is one
pass of the prompt stream over the training prompt list.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rlstitch.sampling.flow import FlowSampler
from rlstitch.train import lora as L

VOCABULARY = ("step = one optimizer update of the learner; iteration = one rollout batch -> scores -> "
              "updates_per_iteration steps -> weight sync to the rollout workers; epoch = one pass over the "
              "training prompt list")
REF = "ref"  # the slot name of the frozen base model (LoRA disabled)


class Policy(nn.Module):
    """A DiffusionBackbone whose trainable weights live in named slots: "default" (trained), extra slots such
    as DiffusionNFT's "old" policy, and "ref" (the frozen base). LoRA slots are peft adapters; with
    lora=False the whole transformer trains and every other slot is a frozen copy."""

    def __init__(self, backbone, lora: bool = True, rank: int = 32, alpha: float = 64,
                 targets: Sequence[str] = L.ATTENTION_TARGETS, slots: Sequence[str] = (), seed: int = 0):
        super().__init__()
        self.backbone, self.lora, self.slots = backbone, lora, (L.DEFAULT, *slots)
        if lora:
            L.add_lora(backbone.model, rank, alpha, targets, names=self.slots, seed=seed)
            self.copies = nn.ModuleDict()
        else:
            backbone.model.requires_grad_(True)
            self.copies = nn.ModuleDict({s: copy.deepcopy(backbone.model).requires_grad_(False)
                                         for s in (*slots, REF)})

    @property
    def model(self) -> nn.Module:
        """The trained transformer (with its adapters)."""
        return self.backbone.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the default adapter, or every transformer weight."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters of slot "default", keyed as in `state`."""
        return L.adapter_params(self.model) if self.lora else dict(self.model.named_parameters())

    def state(self, slot: str = L.DEFAULT) -> dict[str, Tensor]:
        """The weights of a slot (LoRA: adapter-only), as detached float32 CPU copies."""
        if self.lora:
            return L.adapter_state(self.model, slot)
        mod = self.model if slot == L.DEFAULT else self.copies[slot]
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in mod.state_dict().items()}

    @torch.no_grad()
    def load_state(self, state: dict[str, Tensor], slot: str = L.DEFAULT) -> None:
        """Set a slot's weights in place (LoRA: adapter-only)."""
        if self.lora:
            L.load_adapter_state(self.model, state, slot)
        else:
            mod = self.model if slot == L.DEFAULT else self.copies[slot]
            for k, p in mod.state_dict().items():
                p.copy_(state[k].to(p.device, p.dtype))

    def base_state(self) -> dict[str, Tensor]:
        """The non-adapter weights of the transformer (sent once, at the first weight sync)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if "lora_" not in k}

    @torch.no_grad()
    def load_base_state(self, state: dict[str, Tensor]) -> None:
        """Set the non-adapter weights; every one of them must be present."""
        own = {k: v for k, v in self.model.state_dict().items() if "lora_" not in k}
        if set(own) != set(state):
            raise KeyError(f"base weights differ: missing {sorted(set(own) - set(state))[:3]} "
                           f"extra {sorted(set(state) - set(own))[:3]}")
        for k, v in own.items():
            v.copy_(state[k].to(v.device, v.dtype))

    @contextlib.contextmanager
    def use(self, slot: str = L.DEFAULT) -> Iterator[None]:
        """Forward passes inside the block use the weights of `slot`."""
        if slot == L.DEFAULT:
            yield
        elif self.lora:
            with L.adapters_disabled(self.model) if slot == REF else L.use_adapter(self.model, slot):
                yield
        else:
            trained, self.backbone.model = self.backbone.model, self.copies[slot]
            try:
                yield
            finally:
                self.backbone.model = trained

    def velocity(self, z: Tensor, t: Tensor | float, cond, slot: str = L.DEFAULT) -> Tensor:
        """v(z_t, t, cond) under the weights of `slot`, in float32."""
        with self.use(slot):
            return self.backbone.velocity(z, t, cond)

    def forward(self, z: Tensor, t: Tensor | float, cond, slot: str = L.DEFAULT) -> Tensor:
        """Same as `velocity` (so DeepSpeed's engine can call the policy)."""
        return self.velocity(z, t, cond, slot)


# ----------------------------------------------------------------------------------------- rollouts


def draw_stops(n: int, window: Sequence[int] | None, steps: int, generator: torch.Generator,
               group_size: int = 1) -> list[int]:
    """Stop step per sample: `steps` (run to t=0) without a window, else uniform over window [lo, hi] inclusive,
    one draw per group of `group_size` consecutive samples (group_size=1: one per rollout)."""
    if window is None:
        return [steps] * n
    lo, hi = int(window[0]), int(window[1])
    if not 1 <= lo <= hi <= steps:
        raise ValueError(f"stop window [{lo}, {hi}] must lie inside 1..{steps}")
    if n % group_size:
        raise ValueError(f"{n} rollouts do not split into groups of {group_size}")
    draws = torch.randint(lo, hi + 1, (n // group_size,), generator=generator)
    return draws.repeat_interleave(group_size).tolist()


@torch.no_grad()
def sample_to_stops(velocity: Callable[[Tensor, float, Tensor], Tensor], z: Tensor, sampler: FlowSampler,
                    stops: Sequence[int], generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Integrate every sample from t=1 to its own stop step; a sample leaves the batch once it is there, so
    stopping early saves its remaining denoiser calls. `velocity(z, t, rows)` gets the batch rows it is run on."""
    grid = sampler.timesteps()
    stops_t = torch.as_tensor(list(stops), dtype=torch.long)
    if stops_t.numel() != z.shape[0] or bool((stops_t < 0).any()) or bool((stops_t > sampler.steps).any()):
        raise ValueError(f"need one stop in 0..{sampler.steps} per sample, got {list(stops)}")
    out, rows, cur = z.clone(), torch.arange(z.shape[0]), z
    for k in range(int(stops_t.max()) if len(stops_t) else 0):
        keep = stops_t[rows] > k
        rows, cur = rows[keep], cur[keep]
        t, t_next = float(grid[k]), float(grid[k + 1])
        gens = [generators[int(i)] for i in rows] if generators is not None else None
        cur = sampler.step(cur, velocity(cur, t, rows), t, t_next, gens)
        done = stops_t[rows] == k + 1
        out[rows[done]] = cur[done]
    return out


def continue_to_end(velocity: Callable[[Tensor, float, Tensor], Tensor], z: Tensor, sampler: FlowSampler,
                    starts: Sequence[int], generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Integrate each sample from its own step `starts[i]` (where z holds it) on to t=0; rows joining as their
    step comes up (a start of `sampler.steps` leaves the row as it is)."""
    grid = sampler.timesteps()
    starts_t = torch.as_tensor(list(starts), dtype=torch.long)
    if starts_t.numel() != z.shape[0] or bool((starts_t < 0).any()) or bool((starts_t > sampler.steps).any()):
        raise ValueError(f"need one start in 0..{sampler.steps} per sample, got {list(starts)}")
    out = z.clone()
    for k in range(int(starts_t.min()) if len(starts_t) else sampler.steps, sampler.steps):
        rows = (starts_t <= k).nonzero().flatten()
        t, t_next = float(grid[k]), float(grid[k + 1])
        gens = [generators[int(i)] for i in rows] if generators is not None else None
        out[rows] = sampler.step(out[rows], velocity(out[rows], t, rows), t, t_next, gens)
    return out


def stop_times(sampler: FlowSampler, stops: Sequence[int]) -> Tensor:
    """tau = the grid time at each stop step (float32; 0 at the end of the schedule)."""
    return sampler.timesteps()[torch.as_tensor(list(stops), dtype=torch.long)].float()


# ----------------------------------------------------------------------------------------- prompts


class PromptStream:
    """Endless, seeded, resumable: epoch e visits every prompt once, in a permutation seeded by (seed, e)."""

    def __init__(self, prompts: Sequence[str], seed: int = 0):
        if not prompts:
            raise ValueError("the prompt list is empty")
        self.prompts, self.seed = list(prompts), seed
        self.epoch, self.offset = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        """The visiting order of one epoch."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next(self, n: int) -> list[str]:
        """The next n prompts (crossing into the next epoch when needed)."""
        out = []
        while len(out) < n:
            order = self._order(self.epoch)
            take = min(n - len(out), len(order) - self.offset)
            out += [self.prompts[i] for i in order[self.offset : self.offset + take]]
            self.offset += take
            if self.offset == len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        """The data position, for checkpoints."""
        return {"epoch": self.epoch, "offset": self.offset, "size": len(self.prompts), "seed": self.seed}

    def load_state(self, state: dict) -> None:
        """Resume at a saved data position (the prompt list must be the same size). The saved seed is kept: the
        offset counts into that seed's visiting order, so another seed would repeat and skip prompts."""
        if state["size"] != len(self.prompts):
            raise ValueError(f"checkpoint was taken over {state['size']} prompts, now {len(self.prompts)}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.seed = int(state.get("seed", self.seed))
