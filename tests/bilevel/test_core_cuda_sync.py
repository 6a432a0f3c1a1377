r"""No host synchronization inside the solver and linear-solver loops (CUDA only).

``torch.cuda.set_sync_debug_mode("error")`` turns every device-to-host synchronization into an error,
so the fixed-step solvers, CG, Neumann and every strategy's forward and backward must get through
without one (with ``check_finite=False`` and ``check=False`` bounds, the documented GPU settings).
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(device: str):
    n, m = 8, 3
    Q, _ = torch.linalg.qr(torch.randn(n, n, device=device))
    H = Q @ torch.diag(torch.linspace(1.0, 3.0, n, device=device)) @ Q.T
    C = torch.randn(m, n, device=device)

    def g(x, y):
        return 0.5 * (y @ H * y).sum() + (y * (x @ C)).sum() + (y**4).sum() / 4

    x_img = torch.rand(2, n, device=device)  # per-sample bounds, as in adversarial training
    constraint = bl.LInfBall(0.0, 0.2, check=False) & bl.Box(-x_img, 1 - x_img, check=False)
    return g, constraint, torch.randn(m, device=device), torch.zeros(2, n, device=device)


@pytest.mark.parametrize("strategy", [bl.Implicit(bl.CG(maxiter=30)), bl.Implicit(bl.Neumann(steps=10, alpha=0.2)),
                                      bl.Unrolled(), bl.Unrolled(truncate=2), bl.Linearized(0.2),
                                      bl.Linearized(0.2, lam=10.0), bl.Linearized(0.05, sign=True), bl.FirstOrder()],
                         ids=["cg", "neumann", "unrolled", "truncated", "linearized", "linearized-lam", "sign", "first"])
def test_no_sync_in_solve_and_backward(strategy):
    g, constraint, x0, init = _problem("cuda")
    for solver in (bl.ProjectedGradient(0.2, 10), bl.SignedProjectedGradient(0.05, 5)):
        lower = bl.LowerProblem(g, constraint=constraint, solver=solver)
        x = x0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = bl.solve(lower, x, init, strategy, check_finite=False)
            ((y - 0.1) ** 2).sum().mul(x.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(x.grad).all()


def test_no_sync_in_linear_solvers():
    n = 50
    A = torch.randn(n, n, device="cuda")
    A = A @ A.T + n * torch.eye(n, device="cuda")
    b = torch.randn(n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u, info = bl.CG(maxiter=200)(lambda v: A @ v, b)  # far more iterations than needed: frozen, no exit test
        u2, _ = bl.Neumann(steps=20, alpha=0.5 / n)(lambda v: A @ v, b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = torch.linalg.solve(A, b)
    assert torch.allclose(u, ref, rtol=1e-4, atol=1e-5)
    assert float(info.relative_residual) < 1e-4
