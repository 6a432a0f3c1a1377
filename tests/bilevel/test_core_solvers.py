r"""Lower-level solvers: one step each against its formula, convergence, and the graph of ``run``."""

from __future__ import annotations

import pytest
import torch
from _quadratic import quadratic  # noqa: E402

import bilevel as bl


def test_gradient_descent_step_and_convergence():
    q = quadratic(linear_term=False)
    H, C, g = q.H, q.C, q.g
    x, y0 = torch.randn(3), torch.randn(4)
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 1))
    y1 = lower.solver.step(lower, x, y0, create_graph=False)
    assert torch.allclose(y1, y0 - 0.3 * (H @ y0 + C.T @ x), rtol=1e-14)
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 200))
    y = lower.solver.run(lower, x, y0)
    assert torch.allclose(y, -torch.linalg.solve(H, C.T @ x), rtol=1e-12)
    assert not y.requires_grad


def test_projected_and_signed_steps():
    q = quadratic(linear_term=False)
    H, C, g = q.H, q.C, q.g
    x, y0 = torch.randn(3), 0.1 * torch.randn(4)
    lo, hi = -0.2 * torch.ones(4), 0.25 * torch.ones(4)
    lower = bl.LowerProblem(g, constraint=bl.Box(lo, hi))
    # the autograd gradient and the matrix formula are two computations: equal to a few ulps
    _, grad = lower.value_and_grad(x, y0)
    torch.testing.assert_close(grad, H @ y0 + C.T @ x, rtol=8 * torch.finfo(grad.dtype).eps, atol=0.0)
    # the step from that same gradient is the same arithmetic replayed: bit equality
    y_pg = bl.ProjectedGradient(0.3, 1).step(lower, x, y0, create_graph=False)
    assert torch.equal(y_pg, torch.clamp(y0 - 0.3 * grad, lo, hi))
    y_sg = bl.SignedProjectedGradient(0.05, 1).step(lower, x, y0, create_graph=False)
    assert torch.equal(y_sg, torch.clamp(y0 - 0.05 * grad.sign(), lo, hi))
    # projected gradient converges to the constrained minimizer: fixed point y = Proj(y - a grad)
    lower = bl.LowerProblem(g, constraint=bl.Box(lo, hi), solver=bl.ProjectedGradient(0.3, 300))
    y = lower.solver.run(lower, x, y0)
    assert torch.allclose(y, torch.clamp(y - 0.3 * (H @ y + C.T @ x), lo, hi), rtol=0, atol=1e-14)


def test_closed_form_solver():
    q = quadratic(linear_term=False)
    H, C, g = q.H, q.C, q.g
    fn = lambda x: -torch.linalg.solve(H, C.T @ x)  # noqa: E731
    lower = bl.LowerProblem(g, solver=bl.ClosedForm(fn))
    x = torch.randn(3, requires_grad=True)
    y = lower.solver.run(lower, x, torch.zeros(4))
    assert not y.requires_grad and torch.allclose(y, fn(x.detach()))
    y = lower.solver.run(lower, x, torch.zeros(4), differentiable_steps=1)
    assert y.requires_grad


def test_run_keeps_a_graph_only_for_the_last_steps():
    """With differentiable_steps=T the result depends on x only through the last T steps."""
    q = quadratic(linear_term=False)
    H, C, g = q.H, q.C, q.g
    a = 0.3
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(a, 5))
    x = torch.randn(3, requires_grad=True)
    y = lower.solver.run(lower, x, torch.zeros(4), differentiable_steps=2)
    J = torch.stack([torch.autograd.grad(y[i], x, retain_graph=True)[0] for i in range(4)])
    M = torch.eye(4) - a * H
    assert torch.allclose(J, -a * (torch.eye(4) + M) @ C.T, rtol=1e-12)


@pytest.mark.parametrize("make", [lambda: bl.GradientDescent(0.3), lambda: bl.GradientDescent(0.3, 0),
                                  lambda: bl.ProjectedGradient(0.3, 2.5), lambda: bl.SignedProjectedGradient(0.1, -1),
                                  lambda: bl.GradientDescent(float("nan"), 3), lambda: bl.ClosedForm(lambda x: x, 0)],
                         ids=["missing", "zero", "fractional", "negative", "nan-step", "closed-form-zero"])
def test_a_solver_that_would_do_nothing_is_refused(make):
    """A zero-step solver used to return init unchanged (and Unrolled a result without a graph)."""
    with pytest.raises((TypeError, ValueError), match="steps|step_size"):
        make()
