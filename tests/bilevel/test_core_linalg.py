r"""Linear solvers on matvec closures: CG, truncated Neumann series, dense solve."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def _spd(n: int, cond: float = 50.0, dtype=torch.float64) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ Q.T
    return A.to(dtype)


def test_cg_matches_linalg_solve():
    A, b = _spd(30), torch.randn(30)
    u, info = bl.CG(maxiter=80, tol=1e-12)(lambda v: A @ v, b)
    ref = torch.linalg.solve(A, b)
    assert float((u - ref).norm() / ref.norm()) < 1e-10
    true_res = (b - A @ u).norm() / b.norm()
    assert float(info.relative_residual) < 1e-11 and float(true_res) < 1e-10
    assert info.iterations == 80


def test_cg_freezes_after_convergence():
    """maxiter far above n: the iterate stops moving once converged, and nothing turns NaN."""
    A, b = _spd(5, cond=10.0), torch.randn(5)
    ref = torch.linalg.solve(A, b)
    for tol in (1e-10, 0.0):
        u, info = bl.CG(maxiter=500, tol=tol)(lambda v: A @ v, b)
        assert torch.isfinite(u).all() and torch.isfinite(info.residual_norm)
        assert float((u - ref).norm() / ref.norm()) < 1e-12
    u20, _ = bl.CG(maxiter=20, tol=1e-10)(lambda v: A @ v, b)
    u500, _ = bl.CG(maxiter=500, tol=1e-10)(lambda v: A @ v, b)
    assert torch.equal(u20, u500)  # frozen: bitwise identical


def test_cg_zero_rhs_and_float32():
    A = _spd(8)
    u, info = bl.CG(maxiter=50)(lambda v: A @ v, torch.zeros(8))
    assert torch.equal(u, torch.zeros(8)) and float(info.relative_residual) == 0.0
    A32, b32 = A.float(), torch.randn(8, dtype=torch.float32)
    u32, _ = bl.CG(maxiter=200)(lambda v: A32 @ v, b32)
    assert u32.dtype == torch.float32 and torch.isfinite(u32).all()
    ref = torch.linalg.solve(A, b32.double())
    assert float((u32.double() - ref).norm() / ref.norm()) < 1e-4


def test_cg_few_iterations_is_inexact_and_says_so():
    A, b = _spd(30, cond=1000.0), torch.randn(30)
    u, info = bl.CG(maxiter=3)(lambda v: A @ v, b)
    true_rel = (b - A @ u).norm() / b.norm()
    assert float(info.relative_residual) > 1e-3
    assert torch.allclose(info.relative_residual, true_rel, rtol=1e-6)


@pytest.mark.parametrize("K", [1, 2, 5])
def test_neumann_is_the_truncated_series(K):
    A, b, alpha = _spd(6, cond=5.0), torch.randn(6), 0.15
    u, info = bl.Neumann(steps=K, alpha=alpha)(lambda v: A @ v, b)
    M = torch.eye(6) - alpha * A
    series = alpha * sum(torch.linalg.matrix_power(M, k) for k in range(K)) @ b
    assert torch.allclose(u, series, rtol=1e-13, atol=1e-14)
    assert torch.allclose(info.residual_norm, (b - A @ u).norm(), rtol=1e-12)


def test_neumann_converges_for_small_alpha():
    A, b = _spd(6, cond=5.0), torch.randn(6)
    lmax = float(torch.linalg.eigvalsh(A).max())
    u, info = bl.Neumann(steps=400, alpha=1.0 / lmax)(lambda v: A @ v, b)
    assert torch.allclose(u, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    assert float(info.relative_residual) < 1e-10


def test_dense_solve_with_and_without_matmat():
    A, b = _spd(7), torch.randn(7)
    u1, info1 = bl.DenseSolve()(lambda v: A @ v, b)
    u2, _ = bl.DenseSolve()(lambda v: A @ v, b, lambda V: V @ A)
    ref = torch.linalg.solve(A, b)
    assert torch.allclose(u1, ref, rtol=1e-12) and torch.allclose(u2, ref, rtol=1e-12)
    assert info1.iterations == 7 and float(info1.relative_residual) < 1e-13
    u3, _ = bl.DenseSolve(ridge=0.5)(lambda v: A @ v, b)
    assert torch.allclose(u3, torch.linalg.solve(A + 0.5 * torch.eye(7), b), rtol=1e-12)


def test_linear_solver_argument_checks():
    with pytest.raises(ValueError, match="maxiter must be >= 1"):
        bl.CG(maxiter=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        bl.Neumann(steps=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        bl.Neumann(steps=3, alpha=0.0)


def test_cg_recursive_and_true_residual():
    """The free recursive residual agrees with the true one in float64; true_residual=True pays one product."""
    A, b = _spd(30, cond=1000.0), torch.randn(30)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    for k in (3, 12):
        calls.clear()
        u, info = bl.CG(maxiter=k)(matvec, b)
        assert len(calls) == k
        calls.clear()
        u_true, info_true = bl.CG(maxiter=k, true_residual=True)(matvec, b)
        assert len(calls) == k + 1 and torch.equal(u, u_true)
        true_norm = (b - A @ u).norm()
        assert torch.allclose(info_true.residual_norm, true_norm, rtol=1e-12)
        assert torch.allclose(info.residual_norm, true_norm, rtol=1e-6)


def test_cg_rejects_bad_options():
    with pytest.raises(ValueError, match="tol must be >= 0"):
        bl.CG(tol=-1.0)
    with pytest.raises(ValueError, match="maxiter must be >= 1"):
        bl.CG(maxiter=2.5)


def test_cg_warm_start_from_the_solution_stays_there_and_from_nearby_needs_fewer_iterations():
    A, b = _spd(30), torch.randn(30)
    ref = torch.linalg.solve(A, b)
    u, info = bl.CG(maxiter=5, tol=0.0)(lambda v: A @ v, b, x0=ref)
    assert float((u - ref).norm() / ref.norm()) < 1e-12 and float(info.relative_residual) < 1e-12
    near = ref + 1e-3 * torch.randn(30)
    warm, _ = bl.CG(maxiter=5, tol=0.0)(lambda v: A @ v, b, x0=near)
    cold, _ = bl.CG(maxiter=5, tol=0.0)(lambda v: A @ v, b)
    assert float((warm - ref).norm()) < 1e-2 * float((cold - ref).norm())
    # the warm-started iteration is CG on the residual system A d = b - A x0
    d, _ = bl.CG(maxiter=5, tol=0.0)(lambda v: A @ v, b - A @ near)
    assert torch.allclose(warm, near + d, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 4])
def test_neumann_warm_start_is_the_series_on_the_residual(K):
    A, b, x0 = _spd(6, cond=4.0) / 4.0, torch.randn(6), torch.randn(6)
    alpha = 0.9
    u, _ = bl.Neumann(steps=K, alpha=alpha)(lambda v: A @ v, b, x0=x0)
    M = torch.eye(6) - alpha * A
    oracle = x0 + alpha * sum(torch.linalg.matrix_power(M, k) for k in range(K)) @ (b - A @ x0)
    assert torch.allclose(u, oracle, rtol=1e-12, atol=1e-12)
