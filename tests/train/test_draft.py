"""DRaFT-K: truncated backprop through the sampler, the loss and the value-actor surrogate, by hand."""

from __future__ import annotations

import pytest
import torch

from rlstitch.train.draft import draft_loss, draft_surrogate, regulariser, truncated_rollout


def linear_velocity(w):
    """v(z, t) = w z (the gradient in w is easy to write down)."""
    return lambda z, t: w * z


def test_truncated_rollout_by_hand():
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    z = torch.tensor([[1.0, 2.0]])
    w = torch.tensor(0.4, requires_grad=True)
    w0 = 0.1
    z_end, reg = truncated_rollout(linear_velocity(w), linear_velocity(torch.tensor(w0)), z, grid, 0, 2, k=1)
    z1 = z * (1 - 0.5 * 0.4)  # first step without gradient
    torch.testing.assert_close(z_end, z1 * (1 - 0.5 * 0.4))
    torch.testing.assert_close(reg, ((0.4 - w0) ** 2 * z1.square()).mean(1))
    z_end.sum().backward()
    # only the last step carries the gradient: d/dw [z1 (1 - 0.5 w)] = -0.5 z1, z1 held fixed
    assert float(w.grad) == pytest.approx(float((-0.5 * z1).sum()))


def test_truncated_rollout_k_equals_steps_differentiates_everything():
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    z = torch.tensor([[1.0, 2.0]])
    w = torch.tensor(0.4, requires_grad=True)
    z_end, reg = truncated_rollout(linear_velocity(w), linear_velocity(torch.tensor(0.4)), z, grid, 0, 2, k=2)
    z_end.sum().backward()
    # z2 = z (1 - 0.5 w)^2: d/dw = -(1 - 0.5 w) z summed
    assert float(w.grad) == pytest.approx(float((-(1 - 0.2) * z).sum()))
    assert float(reg.sum()) == 0.0  # same weights as the base


def test_draft_loss_by_hand():
    value = torch.tensor([0.2, 0.6])
    reg = torch.tensor([1.0, 3.0])
    assert float(draft_loss(value, reg, 0.01)) == pytest.approx(-0.4 + 0.01 * 2.0)
    assert float(regulariser(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]]))[0]) == pytest.approx(2.5)


def test_surrogate_gradient_equals_the_direct_gradient():
    """-<z_tau, dV/dz> + lambda R has the gradient of -V(z_tau) + lambda R (V frozen, in another process)."""
    grid = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(3, 2, 2, 2, generator=g), torch.randn(2, 2, 2, generator=g)

    def value(x):  # a frozen, nonlinear "value model"
        return torch.tanh((x * c).flatten(1).sum(1))

    grads = []
    for use_surrogate in (False, True):
        w = torch.tensor(0.3, requires_grad=True)
        z_tau, reg = truncated_rollout(lambda x, t, w=w: w * x * (1 + t), lambda x, t: 0.2 * x, z, grid, 0, 2, k=1)
        if use_surrogate:
            zz = z_tau.detach().requires_grad_(True)
            (dv,) = torch.autograd.grad(value(zz).sum(), zz)
            loss = draft_surrogate(z_tau, dv, reg, 0.01)
        else:
            loss = draft_loss(value(z_tau), reg, 0.01)
        loss.backward()
        grads.append(float(w.grad))
    assert grads[1] == pytest.approx(grads[0], rel=1e-6)


def test_surrogate_matches_backward_of_minus_grad():
    """The surrogate's backward equals z_tau.backward(-g / B) (the actor-side recipe in the issue)."""
    w = torch.tensor(0.5, requires_grad=True)
    z_tau = w * torch.arange(8.0).view(2, 4, 1, 1)
    grad = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    draft_surrogate(z_tau, grad, torch.zeros(2), 0.0).backward()
    a = float(w.grad)
    w.grad = None
    z_tau = w * torch.arange(8.0).view(2, 4, 1, 1)
    z_tau.backward(-grad / 2)
    assert a == pytest.approx(float(w.grad))


def test_bad_arguments():
    grid = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="k >= 1"):
        truncated_rollout(lambda x, t: x, lambda x, t: x, torch.zeros(1, 1), grid, 0, 1, k=0)
    with pytest.raises(ValueError, match="does not match"):
        draft_surrogate(torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2))
