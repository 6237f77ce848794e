"""DRaFT-K (SPEC §3): backpropagate a reward (or StitchVM's value at z_tau) through the last K sampler steps.

Loss per rollout: -r(D(z_0)) + lambda R (baseline) or -V(z_tau) + lambda R (StitchVM), where R is the mean
squared distance between the trained velocity and the frozen base model's on the same inputs, averaged over
the K differentiated steps (lambda = 0.01). When V lives in another process (a value actor), the learner gets
g = dV/dz_tau and uses the surrogate -<z_tau, g> + lambda R, whose gradient is exactly what
`z_tau.backward(-g)` plus the regulariser's backward would give (V's own weights are frozen).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, float], Tensor]


def regulariser(v: Tensor, v_base: Tensor) -> Tensor:
    """Per-sample mean squared distance of the trained velocity to the frozen base's, in float32."""
    return (v.float() - v_base.detach().float()).square().flatten(1).mean(1)


def truncated_rollout(velocity: Velocity, base_velocity: Velocity, z: Tensor, grid: Tensor, start: int, stop: int,
                      k: int) -> tuple[Tensor, Tensor]:
    """Euler ODE from grid index `start` to `stop`; only the last k steps keep gradients.

    Returns z at `stop` and the per-sample regulariser R averaged over the differentiated steps.
    """
    if not 0 <= start <= stop < len(grid) or k < 1:
        raise ValueError(f"need 0 <= start <= stop <= {len(grid) - 1} and k >= 1, got start={start} stop={stop} k={k}")
    first_grad = max(start, stop - k)
    reg = z.new_zeros(z.shape[0], dtype=torch.float32)
    with torch.no_grad():
        for j in range(start, first_grad):
            t, t_next = float(grid[j]), float(grid[j + 1])
            z = z + (t_next - t) * velocity(z, t)
    z = z.detach()
    for j in range(first_grad, stop):
        t, t_next = float(grid[j]), float(grid[j + 1])
        v = velocity(z, t)
        with torch.no_grad():
            v_base = base_velocity(z, t)
        reg = reg + regulariser(v, v_base)
        z = z + (t_next - t) * v
    return z, reg / max(stop - first_grad, 1)


def draft_loss(value: Tensor, reg: Tensor, reg_weight: float = 0.01) -> Tensor:
    """-mean(value) + lambda mean(R), with the value (reward or V(z_tau)) differentiable in the policy."""
    return -value.float().mean() + reg_weight * reg.float().mean()


def draft_surrogate(z_stop: Tensor, value_grad: Tensor, reg: Tensor, reg_weight: float = 0.01) -> Tensor:
    """A scalar whose gradient equals that of `draft_loss` when dV/dz_stop = value_grad comes from a value actor."""
    if value_grad.shape != z_stop.shape:
        raise ValueError(f"value gradient {tuple(value_grad.shape)} does not match z {tuple(z_stop.shape)}")
    g = value_grad.detach().to(z_stop.device, torch.float32)
    return -(z_stop.float() * g).flatten(1).sum(1).mean() + reg_weight * reg.float().mean()
