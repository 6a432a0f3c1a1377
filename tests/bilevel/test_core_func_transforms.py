r"""Composition with torch.func: grad over ``lambda x: f(x, bl.solve(...))`` and vmap over a batch of x."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

STRATEGIES = {
    "implicit-cg": lambda: bl.Implicit(bl.CG(maxiter=40)),
    "implicit-dense": lambda: bl.Implicit(bl.DenseSolve()),
    "implicit-neumann": lambda: bl.Implicit(bl.Neumann(steps=20, alpha=0.5)),
    "unrolled": lambda: bl.Unrolled(),
    "unrolled-truncated": lambda: bl.Unrolled(truncate=2),
    "linearized": lambda: bl.Linearized(step=0.5),
    "linearized-lam": lambda: bl.Linearized(step=0.5, lam=4.0),
    "first-order": lambda: bl.FirstOrder(),
}


def _autograd(P, lower, x0, strategy):
    x = x0.clone().requires_grad_()
    P.f(x, bl.solve(lower, x, P.init, strategy)).backward()
    return x.grad


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_func_grad_equals_autograd(mlp_problem, name):
    P = mlp_problem
    lower = P.lower(6)  # the two paths run the same solver: agreement does not need convergence
    strategy = STRATEGIES[name]()
    ref = _autograd(P, lower, P.x0, strategy)
    got = torch.func.grad(lambda x: P.f(x, bl.solve(lower, x, P.init, strategy)))(P.x0)
    assert (ref - 0.1 * torch.cos(P.x0)).abs().max() > 1e-6 or name == "first-order"
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["implicit-cg", "implicit-dense", "unrolled", "linearized", "first-order"])
def test_vmap_of_grad_over_a_batch_of_x(mlp_problem, name):
    P = mlp_problem
    lower = P.lower(6)
    strategy = STRATEGIES[name]()
    xs = P.x0 + 0.3 * torch.randn(3, 3)
    batched = torch.func.vmap(torch.func.grad(lambda x: P.f(x, bl.solve(lower, x, P.init, strategy))))(xs)
    loop = torch.stack([_autograd(P, lower, x, strategy) for x in xs])
    assert torch.allclose(batched, loop, rtol=1e-10, atol=1e-13)


def test_vmap_of_solve_implicit_jacobian_rows():
    """vmap of the solution itself (forward) and of a vjp through it (backward)."""
    n, m = 4, 3
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    H = Q @ torch.diag(torch.linspace(1.0, 3.0, n)) @ Q.T
    C = torch.randn(m, n)
    lower = bl.LowerProblem(lambda x, y: 0.5 * y @ H @ y + x @ C @ y + (y**4).sum() / 4,
                            solver=bl.GradientDescent(0.2, 60))
    strategy = bl.Implicit(bl.CG(maxiter=20))
    xs = torch.randn(5, m)
    ys = torch.func.vmap(lambda x: bl.solve(lower, x, torch.zeros(n), strategy))(xs)
    for i in range(5):
        assert torch.allclose(ys[i], bl.solve(lower, xs[i], torch.zeros(n), strategy), rtol=0, atol=1e-14)
    jac = torch.func.vmap(torch.func.jacrev(lambda x: bl.solve(lower, x, torch.zeros(n), strategy)))(xs)
    for i in range(5):  # implicit Jacobian: -(H + 3 diag(y^2))^-1 C'
        Hy = H + 3 * torch.diag(ys[i] ** 2)
        assert torch.allclose(jac[i], -torch.linalg.solve(Hy, C.T), rtol=1e-9, atol=1e-12)


def test_func_grad_implicit_with_box(mlp_problem):
    """The masked system under torch.func (free_mask on functorch-wrapped tensors)."""
    P = mlp_problem
    lower = P.lower(40, constraint=bl.Box(-0.3, 0.3))
    strategy = bl.Implicit(bl.DenseSolve())
    w = bl.solve(lower, P.x0, P.init, bl.FirstOrder())
    masks = lower.free_mask(list(w.values()))
    assert any(bool(m.any()) for m in masks) and any(bool((~m).any()) for m in masks)
    ref = _autograd(P, lower, P.x0, strategy)
    got = torch.func.grad(lambda x: P.f(x, bl.solve(lower, x, P.init, strategy)))(P.x0)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-13)
