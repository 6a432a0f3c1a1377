r"""Closed-form oracles: ridge, quadratic, box-constrained QP, linear meta-learning.

Every strategy that applies is compared with the closed-form hypergradient in float64.
"""

from __future__ import annotations

import pytest
import torch
from _quadratic import quadratic  # noqa: E402

import bilevel as bl


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(fn, x)


# ----------------------------------------------------------------------------------------------
# 1. Ridge regression with one lambda per feature: x = lam, y = w.
# ----------------------------------------------------------------------------------------------

def _ridge():
    n, nv, d = 20, 15, 5
    X, yt = torch.randn(n, d) / n**0.5, torch.randn(n)
    Xv, yv = torch.randn(nv, d) / nv**0.5, torch.randn(nv)
    lam = torch.exp(0.5 * torch.randn(d))

    def g(lam_, w):
        return 0.5 * ((X @ w - yt) ** 2).sum() + 0.5 * (lam_ * w**2).sum()

    def f(lam_, w):
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    def w_star(lam_):
        return torch.linalg.solve(X.T @ X + torch.diag(lam_), X.T @ yt)

    A = X.T @ X + torch.diag(lam)
    w = w_star(lam)
    oracle = -w * torch.linalg.solve(A, Xv.T @ (Xv @ w - yv))
    lmax = float(torch.linalg.eigvalsh(A).max())
    return g, f, w_star, lam, d, oracle, lmax


@pytest.mark.parametrize("case", ["cg", "dense", "neumann", "unrolled", "implicit_gd", "cg_central", "cg_forward",
                                  "dense_central"])
def test_ridge_per_feature_lambda(case):
    g, f, w_star, lam, d, oracle, lmax = _ridge()
    step = 1.0 / lmax
    exact = bl.ClosedForm(w_star)
    strategy, solver = {
        "cg": (bl.Implicit(bl.CG(maxiter=20)), exact),
        "dense": (bl.Implicit(bl.DenseSolve()), exact),
        "neumann": (bl.Implicit(bl.Neumann(steps=300, alpha=step)), exact),
        "unrolled": (bl.Unrolled(), bl.GradientDescent(step, 300)),
        "implicit_gd": (bl.Implicit(bl.CG(maxiter=20)), bl.GradientDescent(step, 300)),
        # Hessian-vector and mixed products by differences of first-order gradients
        "cg_central": (bl.Implicit(bl.CG(maxiter=20), products=bl.CentralDifference()), exact),
        "cg_forward": (bl.Implicit(bl.CG(maxiter=20), products=bl.ForwardDifference()), exact),
        "dense_central": (bl.Implicit(bl.DenseSolve(), products=bl.CentralDifference()), exact),
    }[case]
    lower = bl.LowerProblem(g, solver=solver)
    x = lam.clone().requires_grad_()
    w = bl.solve(lower, x, torch.zeros(d), strategy)
    assert rel(w.detach(), w_star(lam)) < 1e-10
    f(x, w).backward()
    assert rel(x.grad, oracle) < 1e-6
    # the sign matters: a wrong-sign hypergradient has relative error 2
    assert torch.dot(x.grad, oracle) > 0


def test_ridge_value_and_hypergrad_functional_form():
    g, f, w_star, lam, d, oracle, _ = _ridge()
    lower = bl.LowerProblem(g, solver=bl.ClosedForm(w_star))
    x = lam.clone().requires_grad_()
    value, grad = bl.value_and_hypergrad(f, lower, x, torch.zeros(d), bl.Implicit(bl.DenseSolve()))
    assert x.grad is None  # nothing written
    assert rel(grad, oracle) < 1e-10
    assert torch.allclose(value, f(lam, w_star(lam)), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# 2. Quadratic lower problem g = 0.5 y'Hy + x'Cy + a'y (implicit part; unrolling in test_core_unrolled.py).
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("linear_solver,products", [
    (bl.CG(maxiter=30), bl.Exact()), (bl.DenseSolve(), bl.Exact()), (bl.Neumann(steps=400, alpha=0.3), bl.Exact()),
    (bl.CG(maxiter=30), bl.CentralDifference()), (bl.CG(maxiter=30), bl.ForwardDifference())],
    ids=["cg", "dense", "neumann", "cg-central", "cg-forward"])
def test_quadratic_implicit(linear_solver, products):
    q = quadratic()
    H, C, g, y_star = q.H, q.C, q.g, q.y_star
    t = torch.randn(4)

    def f(x, y):
        return 0.5 * ((y - t) ** 2).sum() + (y**3).sum() / 3 + torch.sin(x).sum()

    x0 = torch.randn(3)
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 400))
    x = x0.clone().requires_grad_()
    y = bl.solve(lower, x, torch.zeros(4), bl.Implicit(linear_solver, products=products))
    f(x, y).backward()
    ys = y_star(x0)
    gy = (ys - t) + ys**2
    oracle = torch.cos(x0) - C @ torch.linalg.solve(H, gy)
    assert rel(y.detach(), ys) < 1e-12
    # differences of the gradients of a quadratic have no truncation error, only rounding
    assert rel(x.grad, oracle) < (1e-9 if isinstance(products, bl.Exact) else 1e-7)


# ----------------------------------------------------------------------------------------------
# 3. Box-constrained QP: g = 0.5 y'Hy - y'Bx + c'y on lo <= y <= hi, with a known active set.
# ----------------------------------------------------------------------------------------------

def _box_qp(batch: tuple = (), n: int = 6, m: int = 3):
    """Build the instance from its solution: y* has 2 coordinates at the upper bound, 1 at the lower
    bound and 3 strictly inside; c is chosen so that the KKT conditions hold with multipliers of size
    >= 0.5 (strict complementarity, so the active set is stable under small changes of x)."""
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    H = Q @ torch.diag(torch.linspace(1.0, 2.5, n)) @ Q.T
    B, x0 = torch.randn(n, m), torch.randn(m)
    lo = -1.0 - torch.rand(*batch, n)
    hi = 1.0 + torch.rand(*batch, n)
    state = torch.tensor([1, 0, -1, 0, 1, 0])  # +1: at the upper bound, -1: at the lower bound, 0: free
    state = state.expand(*batch, n)
    interior = lo + (hi - lo) * (0.25 + 0.5 * torch.rand(*batch, n))
    y_opt = torch.where(state > 0, hi, torch.where(state < 0, lo, interior))
    mult = 0.5 + torch.rand(*batch, n)
    grad_at_opt = torch.where(state > 0, -mult, torch.where(state < 0, mult, torch.zeros_like(mult)))
    c = grad_at_opt - (y_opt @ H - B @ x0)  # grad_y g = H y - B x + c

    def g(x, y):
        return (0.5 * (y @ H) * y).sum() - (y * (B @ x)).sum() + (c * y).sum()

    free = state == 0
    return H, B, x0, lo, hi, y_opt, free, g


def _box_oracle(H, B, free):
    """dy/dx: H_FF^-1 B_F on the free coordinates, zero on the active ones."""
    f_idx = free.nonzero().squeeze(-1)
    J = torch.zeros(H.shape[0], B.shape[1])
    J[f_idx] = torch.linalg.solve(H[f_idx][:, f_idx], B[f_idx])
    return J


@pytest.mark.parametrize("strategy", [bl.Implicit(bl.CG(maxiter=30)), bl.Implicit(bl.DenseSolve()),
                                      bl.Implicit(bl.Neumann(steps=600, alpha=0.35)), bl.Unrolled()],
                         ids=["cg", "dense", "neumann", "unrolled"])
def test_box_qp_active_set(strategy):
    H, B, x0, lo, hi, y_opt, free, g = _box_qp()
    assert free.any() and (~free).any()
    lower = bl.LowerProblem(g, constraint=bl.Box(lo, hi), solver=bl.ProjectedGradient(0.35, 400))
    init = torch.zeros(6)
    y = bl.solve(lower, x0, init, bl.FirstOrder())
    assert torch.allclose(y, y_opt, atol=1e-12, rtol=0)
    # the instance really has both kinds of coordinates at the computed solution
    mask = lower.free_mask([y])[0]
    assert torch.equal(mask, free) and 0 < int(mask.sum()) < 6
    J = jacobian(lambda x: bl.solve(lower, x, init, strategy), x0)
    oracle = _box_oracle(H, B, free)
    assert torch.allclose(J, oracle, atol=1e-9, rtol=0)
    assert J[~free].abs().max() == 0  # active coordinates do not move
    # without the mask the answer is the unconstrained H^-1 B, far from the truth
    assert (torch.linalg.solve(H, B) - oracle).abs().max() > 1e-2


def test_box_qp_residual_diagnostics():
    H, B, x0, lo, hi, y_opt, free, g = _box_qp()
    lower = bl.LowerProblem(g, constraint=bl.Box(lo, hi), solver=bl.ProjectedGradient(0.35, 400))
    strategy = bl.Implicit(bl.CG(maxiter=30))
    x = x0.clone().requires_grad_()
    y = bl.solve(lower, x, torch.zeros(6), strategy)
    assert strategy.last_info is None
    (y**2).sum().backward()
    info = strategy.last_info
    assert float(info.relative_residual) < 1e-9
    assert float(info.rhs_norm) > 0


@pytest.mark.parametrize("linear_solver", [bl.CG(maxiter=30), bl.DenseSolve()], ids=["cg", "dense"])
def test_box_qp_per_sample_bounds(linear_solver):
    Bsz, n, m = 3, 6, 3
    H, B, x0, lo, hi, y_opt, free, g = _box_qp(batch=(Bsz,))
    assert lo.shape == (Bsz, n)
    lower = bl.LowerProblem(g, constraint=bl.Box(lo, hi), solver=bl.ProjectedGradient(0.35, 400))
    init = torch.zeros(Bsz, n)
    y = bl.solve(lower, x0, init, bl.FirstOrder())
    assert torch.allclose(y, y_opt, atol=1e-12, rtol=0)
    J = jacobian(lambda x: bl.solve(lower, x, init, bl.Implicit(linear_solver)), x0)
    assert J.shape == (Bsz, n, m)
    for b in range(Bsz):
        assert torch.allclose(J[b], _box_oracle(H, B, free[b]), atol=1e-9, rtol=0)


def test_box_qp_all_active_gives_zero_and_no_nan():
    """Every coordinate active: the masked system is the identity, the right-hand side zero."""
    H, B, x0, lo, hi, y_opt, free, g = _box_qp()
    lower = bl.LowerProblem(g, constraint=bl.Box(0.0, 0.0), solver=bl.ProjectedGradient(0.35, 5))
    x = x0.clone().requires_grad_()
    y = bl.solve(lower, x, torch.zeros(6), bl.Implicit(bl.CG(maxiter=50)))
    ((y - 1.0) ** 2).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))


# ----------------------------------------------------------------------------------------------
# 5. Linear-regression meta-learning: MAML (one unrolled step) and iMAML (implicit).
# ----------------------------------------------------------------------------------------------

def _linreg_tasks(d: int = 4):
    Xt, yt = torch.randn(10, d), torch.randn(10)
    Xv, yv = torch.randn(7, d), torch.randn(7)

    def L_train(w):
        return 0.5 * ((Xt @ w - yt) ** 2).mean()

    def L_val(w):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    def grad_train(w):
        return Xt.T @ (Xt @ w - yt) / Xt.shape[0]

    def grad_val(w):
        return Xv.T @ (Xv @ w - yv) / Xv.shape[0]

    A = Xt.T @ Xt / Xt.shape[0]
    return L_train, L_val, grad_train, grad_val, A


def test_maml_one_step_unrolled():
    r"""MAML: w' = phi - a grad L_train(phi); dL_val(w')/dphi = (I - aA)' grad L_val(w').

    In the solve API the adaptation is the lower problem in the displacement u = w - phi:
    g(phi, u) = L_train(phi + u), one gradient step from u = 0, so w' = phi + u_1."""
    d, a = 4, 0.1
    L_train, L_val, grad_train, grad_val, A = _linreg_tasks(d)
    lower = bl.LowerProblem(lambda phi, u: L_train(phi + u), solver=bl.GradientDescent(a, 1))
    phi0 = torch.randn(d)
    phi = phi0.clone().requires_grad_()
    u = bl.solve(lower, phi, torch.zeros(d), bl.Unrolled())
    L_val(phi + u).backward()
    w1 = phi0 - a * grad_train(phi0)
    oracle = (torch.eye(d) - a * A).T @ grad_val(w1)
    assert torch.allclose(phi.grad, oracle, rtol=1e-12, atol=1e-14)
    # first-order MAML drops the (I - aA) factor: it must differ
    assert (grad_val(w1) - oracle).abs().max() > 1e-3


@pytest.mark.parametrize("linear_solver", [bl.CG(maxiter=30), bl.DenseSolve()], ids=["cg", "dense"])
def test_imaml_implicit(linear_solver):
    r"""iMAML: w*(phi) = argmin L_train(w) + lam/2 ||w - phi||^2; dL_val(w*)/dphi = lam (A + lam I)^-1 grad L_val(w*)."""
    d, lam = 4, 0.5
    L_train, L_val, grad_train, grad_val, A = _linreg_tasks(d)
    L = float(torch.linalg.eigvalsh(A + lam * torch.eye(d)).max())
    lower = bl.LowerProblem(lambda phi, w: L_train(w) + 0.5 * lam * ((w - phi) ** 2).sum(),
                            solver=bl.GradientDescent(1.0 / L, 500))
    phi0 = torch.randn(d)
    phi = phi0.clone().requires_grad_()
    w = bl.solve(lower, phi, torch.zeros(d), bl.Implicit(linear_solver))
    L_val(w).backward()
    w_opt = torch.linalg.solve(A + lam * torch.eye(d), -grad_train(torch.zeros(d)) + lam * phi0)  # A w - b = -(b)
    assert torch.allclose(w.detach(), w_opt, rtol=0, atol=1e-12)
    oracle = lam * torch.linalg.solve(A + lam * torch.eye(d), grad_val(w_opt))
    assert rel(phi.grad, oracle) < 1e-10
