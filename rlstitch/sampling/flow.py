"""Flow-matching samplers (SPEC §0): t=1 noise -> t=0 clean, Euler ODE or a stochastic (SDE) step.

Convention: z_t = (1-t) z0 + t eps, velocity v = eps - z0, Tweedie z0_hat = z_t - t v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# hook(step_index, t, t_next, z, v) -> v: may return a modified velocity (guidance).
VelocityHook = Callable[[int, float, float, Tensor, Tensor], Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3/FLUX time shift: t' = s t / (1 + (s-1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """The steps+1 times from 1 to 0 (float64 for exact bookkeeping), shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:  # 0 makes t=1 a 0/0 (NaN), a negative shift puts a pole inside (0, 1)
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


SDE_SEED_OFFSET = 7919  # a sample's SDE noise stream: its seed + this (its initial noise: the seed itself)


def generators(seeds: Sequence[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with its seed + offset (a sample's noise then does not depend on its
    batch); offset=SDE_SEED_OFFSET gives the SDE noise streams of samples whose initial noise used `seeds`."""
    return [torch.Generator().manual_seed(int(s) + offset) for s in seeds]


def randn(shape: Sequence[int], generator: Generator, device=None, dtype=torch.float32) -> Tensor:
    """Gaussian noise; a list of generators seeds each batch row separately (batch-split invariant)."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


def tweedie(z: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """One-step clean estimate z0_hat = z_t - t v."""
    return z - bcast(t, z) * v


def bcast(t: Tensor | float, z: Tensor) -> Tensor:
    """A scalar or per-sample time, shaped to broadcast against z."""
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    return t.reshape(-1, *([1] * (z.dim() - 1))) if t.dim() else t


def forward_noise(z0: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
    """The forward path z_t = (1-t) z0 + t eps."""
    t = bcast(t, z0)
    return (1 - t) * z0 + t * eps


@dataclass
class SampleOutput:
    """Result of a (possibly partial) sampling run."""

    z: Tensor  # latent at the stop time
    timesteps: Tensor  # the times visited, start .. stop (float64)
    trajectory: list[Tensor] = field(default_factory=list)  # z at each visited time if kept


@dataclass
class FlowSampler:
    """Euler ODE / stochastic flow sampler over a velocity function.

    The SDE step is the DDIM-form discretisation of the reverse SDE with diffusion g^2 = noise_level^2 * t/(1-t)
    (SPEC: noise_level=2, i.e. nu^2 = 4t/(1-t)): z' = (1-t') z0_hat + sqrt(t'^2 - s^2) eps_hat + s xi with
    s^2 = min(g^2 |dt|, t'^2). It is stable for any step size and matches Euler-Maruyama as dt -> 0.
    """

    steps: int = 20
    shift: float = 1.0
    sde: bool = False
    noise_level: float = 2.0
    grid: tuple[float, ...] | None = None  # explicit times 1 -> 0 (a pipeline's schedule); None: shifted linspace

    def __post_init__(self):
        """An explicit grid must hold steps+1 times falling from <= 1 to 0 (shift is then unused)."""
        g = self.grid
        if g is not None and (len(g) != self.steps + 1 or not 0 < g[0] <= 1 or g[-1] != 0
                              or any(a <= b for a, b in zip(g, g[1:], strict=False))):
            raise ValueError(f"grid must hold steps+1={self.steps + 1} strictly falling times from <= 1 to 0, got "
                             f"{len(g)}: {list(g)[:3]} .. {list(g)[-2:]}")

    def timesteps(self) -> Tensor:
        """The full time grid 1 -> 0."""
        if self.grid is not None:
            return torch.tensor(self.grid, dtype=torch.float64)
        return time_grid(self.steps, self.shift)

    def step(self, z: Tensor, v: Tensor, t: float, t_next: float, generator: Generator = None) -> Tensor:
        """One sampler step from t to t_next given the velocity at (z, t)."""
        if not self.sde or t_next <= 0:
            return z + (t_next - t) * v
        z0_hat = z - t * v
        eps_hat = z + (1 - t) * v
        g2 = self.noise_level**2 * t / max(1 - t, 1e-6)
        var = min(g2 * (t - t_next), t_next**2)
        noise = randn(z.shape, generator, z.device, z.dtype)
        return (1 - t_next) * z0_hat + (t_next**2 - var) ** 0.5 * eps_hat + var**0.5 * noise

    def sample(
        self,
        velocity: Callable[[Tensor, float], Tensor],
        z: Tensor,
        *,
        start: int = 0,
        stop: int | None = None,
        generator: Generator = None,
        hook: VelocityHook | None = None,
        keep_trajectory: bool = False,
    ) -> SampleOutput:
        """Integrate from grid index `start` to `stop` (default: the end, t=0); returns z at `stop`."""
        grid = self.timesteps()
        stop = self.steps if stop is None else stop
        if not 0 <= start <= stop <= self.steps:
            raise ValueError(f"need 0 <= start <= stop <= steps={self.steps}, got start={start} stop={stop}")
        traj = [z] if keep_trajectory else []
        for k in range(start, stop):
            t, t_next = float(grid[k]), float(grid[k + 1])
            v = velocity(z, t)
            if hook is not None:
                v = hook(k, t, t_next, z, v)
            z = self.step(z, v, t, t_next, generator)
            if keep_trajectory:
                traj.append(z)
        return SampleOutput(z=z, timesteps=grid[start : stop + 1], trajectory=traj)
