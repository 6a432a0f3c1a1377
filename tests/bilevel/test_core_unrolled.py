r"""Unrolled differentiation against its exact closed forms on a quadratic.

g = 0.5 y'Hy + x'Cy + a'y, gradient descent with step a from an x-independent start:

    y_{k+1} = (I - aH) y_k - a (C'x + a0)   =>   dy_K/dx = -a sum_{k<K} (I - aH)^k C' = -(I - (I - aH)^K) H^-1 C'.

Truncation to the last T steps treats y_{K-T} as a constant, so its Jacobian is the T-step formula.
A K-term Neumann series with alpha = a at y* is K-step unrolling started at y*.
"""

from __future__ import annotations

import pytest
import torch
from _quadratic import quadratic  # noqa: E402

import bilevel as bl


def _unrolled_jac(H, C, a, K):
    n = H.shape[0]
    M = torch.linalg.matrix_power(torch.eye(n) - a * H, K)
    return -(torch.eye(n) - M) @ torch.linalg.solve(H, C.T)


def _jacobian(lower, x0, init, strategy):
    return torch.autograd.functional.jacobian(lambda x: bl.solve(lower, x, init, strategy), x0)


@pytest.mark.parametrize("K", [1, 3, 7])
def test_unrolled_k_steps_exact(K):
    q = quadratic()
    H, C, g = q.H, q.C, q.g
    a = 0.2
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(a, K))
    x0, init = torch.randn(3), torch.randn(4)  # a nonzero start: it must not matter
    J = _jacobian(lower, x0, init, bl.Unrolled())
    oracle = _unrolled_jac(H, C, a, K)
    assert torch.allclose(J, oracle, rtol=0, atol=1e-12)
    # and it is not the implicit Jacobian for small K
    assert (J - (-torch.linalg.solve(H, C.T))).abs().max() > 1e-3


@pytest.mark.parametrize("K,T", [(7, 3), (7, 1), (5, 5), (4, 9)])
def test_unrolled_truncated_exact(K, T):
    q = quadratic()
    H, C, g = q.H, q.C, q.g
    a = 0.2
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(a, K))
    x0, init = torch.randn(3), torch.randn(4)
    J = _jacobian(lower, x0, init, bl.Unrolled(truncate=T))
    assert torch.allclose(J, _unrolled_jac(H, C, a, min(T, K)), rtol=0, atol=1e-12)
    # the value is the full K-step iterate whatever T is
    y_full = bl.solve(lower, x0, init, bl.FirstOrder())
    assert torch.allclose(bl.solve(lower, x0, init, bl.Unrolled(truncate=T)), y_full, rtol=0, atol=1e-14)


def test_unrolled_truncate_zero_is_first_order():
    q = quadratic()
    g = q.g
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.2, 4))
    x = torch.randn(3, requires_grad=True)
    y = bl.solve(lower, x, torch.zeros(4), bl.Unrolled(truncate=0))
    assert not y.requires_grad


@pytest.mark.parametrize("K", [1, 4, 9])
def test_neumann_equals_unrolling_from_solution(K):
    q = quadratic()
    H, C, a0, g = q.H, q.C, q.a0, q.g
    a = 0.2
    t = torch.randn(4)

    def f(x, y):
        return ((y - t) ** 2).sum() + (y**3).sum() + (x**2).sum()

    x0 = torch.randn(3)
    y_opt = -torch.linalg.solve(H, C.T @ x0 + a0)
    neumann = bl.LowerProblem(g, solver=bl.ClosedForm(lambda x: -torch.linalg.solve(H, C.T @ x + a0)))
    _, g_neu = bl.value_and_hypergrad(f, neumann, x0, torch.zeros(4), bl.Implicit(bl.Neumann(steps=K, alpha=a)))
    unrolled = bl.LowerProblem(g, solver=bl.GradientDescent(a, K))
    _, g_unr = bl.value_and_hypergrad(f, unrolled, x0, y_opt, bl.Unrolled())
    assert torch.allclose(g_neu, g_unr, rtol=0, atol=1e-12)
    # both equal the closed form of the K-term series
    gy = 2 * (y_opt - t) + 3 * y_opt**2
    assert torch.allclose(g_neu, 2 * x0 + _unrolled_jac(H, C, a, K).T @ gy, rtol=0, atol=1e-12)


def test_neumann_equals_unrolling_from_solution_nonlinear(mlp_problem):
    """Same identity on the MLP lower problem: at y*, every unrolled step sees the Hessian at y*."""
    P, K = mlp_problem, 5
    y_opt = bl.solve(P.lower(150), P.x0, P.init, bl.FirstOrder())
    implicit = bl.LowerProblem(P.g, solver=bl.GradientDescent(P.step, 150))
    _, g_neu = bl.value_and_hypergrad(P.f, implicit, P.x0, y_opt, bl.Implicit(bl.Neumann(steps=K, alpha=P.step)))
    _, g_unr = bl.value_and_hypergrad(P.f, P.lower(K), P.x0, y_opt, bl.Unrolled())
    assert torch.allclose(g_neu, g_unr, rtol=1e-10, atol=1e-13)


def test_unrolled_projected_and_signed_steps_match_autograd_of_the_loop():
    """Unrolled through ProjectedGradient equals autograd through a hand-written clamp loop."""
    q = quadratic()
    H, C, a0, g = q.H, q.C, q.a0, q.g
    a, K = 0.2, 6
    lo, hi = -0.3 * torch.ones(4), 0.3 * torch.ones(4)
    lower = bl.LowerProblem(g, constraint=bl.Box(lo, hi), solver=bl.ProjectedGradient(a, K))
    x0, init = torch.randn(3), torch.zeros(4)

    def loop(x):
        y = init
        for _ in range(K):
            y = torch.clamp(y - a * (H @ y + C.T @ x + a0), lo, hi)
        return y

    J = _jacobian(lower, x0, init, bl.Unrolled())
    assert torch.allclose(J, torch.autograd.functional.jacobian(loop, x0), rtol=0, atol=1e-12)
    signed = bl.LowerProblem(g, constraint=bl.Box(lo, hi), solver=bl.SignedProjectedGradient(0.05, 3))
    J_sign = _jacobian(signed, x0, init, bl.Unrolled())
    assert torch.equal(J_sign, torch.zeros(4, 3))  # sign has zero derivative


def test_a_full_unroll_differentiates_through_init_as_maml_needs():
    """MAML: w_K = K gradient steps from theta; dw_K/dtheta = prod (1 - a g'') through the start (a truncated unroll
    treats its start as a constant: no gradient through init)."""
    lower = bl.LowerProblem(lambda x, w: ((w - 3.0) ** 2).sum(), solver=bl.GradientDescent(0.1, 5))
    theta = torch.tensor([1.0], requires_grad=True)
    bl.solve(lower, theta, theta, bl.Unrolled()).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([0.8 ** 5]), rtol=1e-14, atol=0.0)
    got = torch.func.grad(lambda th: bl.solve(lower, th, th, bl.Unrolled()).sum())(torch.tensor([1.0]))
    torch.testing.assert_close(got, torch.tensor([0.8 ** 5]), rtol=1e-14, atol=0.0)
    for solver in (bl.SGD(0.1, 5, momentum=0.5), bl.Adam(0.1, 5)):
        lower = bl.LowerProblem(lambda x, w: ((w - 3.0) ** 2).sum() + 0.1 * (w * x).sum(), solver=solver)
        ref = torch.func.grad(lambda th, solver=solver: _loop_from(solver, th))(torch.tensor([1.0]))
        got = torch.func.grad(lambda th, lower=lower: bl.solve(lower, th, th, bl.Unrolled()).sum())(torch.tensor([1.0]))
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    theta = torch.tensor([1.0], requires_grad=True)
    truncated = bl.LowerProblem(lambda x, w: ((w - 3.0) ** 2).sum(), solver=bl.GradientDescent(0.1, 5))
    with pytest.warns(bl.HypergradientWarning, match=r"truncate=2 makes the start a constant"):
        w = bl.solve(truncated, theta, theta, bl.Unrolled(truncate=2))
    # g does not involve theta, and the truncated start is a constant: nothing reaches theta (and it says so)
    assert torch.autograd.grad(w.sum(), theta, allow_unused=True) == (None,)


def _loop_from(solver, th):
    """The same solver's updates written out, from init = th, with f's x = th."""
    w, buf, m, v = th, None, 0.0, 0.0
    for k in range(5):
        d = 2 * (w - 3.0) + 0.1 * th
        if isinstance(solver, bl.SGD):
            buf = d if buf is None else 0.5 * buf + d
            w = w - 0.1 * buf
        else:
            m, v = 0.9 * m + 0.1 * d, 0.999 * v + 0.001 * d * d
            w = w - 0.1 * (m / (1 - 0.9 ** (k + 1))) / (torch.sqrt(v / (1 - 0.999 ** (k + 1)) + 1e-16) + 1e-8)
    return w.sum()
