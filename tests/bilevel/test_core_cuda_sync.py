r"""No host synchronization inside the solver and linear-solver loops (CUDA only).

``torch.cuda.set_sync_debug_mode("error")`` turns every device-to-host synchronization into an error,
so the fixed-step solvers, CG, Neumann and every strategy's forward and backward must get through
without one (with ``check=False`` bounds and ``Implicit(check=None)``; ``solve``'s default ``check_finite=None``
does not check on an accelerator, and the default ``ConvergenceCheck`` syncs only on its checked solves).
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


@pytest.mark.parametrize("strategy", [bl.Implicit(bl.CG(maxiter=30), check=None),
                                      bl.Implicit(bl.Neumann(steps=10, alpha=0.2), check=None),
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


def _stochastic_problem(device: str):
    """A mini-batch quadratic: rows of D indexed by the batch; box-constrained lower variable."""
    n, m, N = 8, 3, 64
    D = torch.randn(N, n, device=device)
    C = torch.randn(m, n, device=device)
    T = torch.randn(N, device=device)

    def g(x, y, batch):
        return 0.5 * ((D[batch] @ y) ** 2).mean() + 0.5 * (y**2).sum() + x @ C @ y

    def f(x, y, batch):
        return 0.5 * ((D[batch] @ y - T[batch]) ** 2).mean() + 0.5 * (x**2).sum()

    lower = bl.LowerProblem(g, constraint=bl.Box(-0.5, 0.5, check=False))
    return lower, f, bl.RandomBatches(N, 16, seed=0, device=device), torch.randn(m, device=device), torch.zeros(n, device=device)


@pytest.mark.parametrize("method", ["soba", "f2sa", "bome"])
def test_no_sync_in_single_loop_steps(method):
    lower, f, batches, x0, y0 = _stochastic_problem("cuda")
    cls = {"soba": bl.SOBA, "f2sa": bl.F2SA, "bome": bl.BOME}[method]
    algo = cls(lower, f, step_size=0.1, lower_batches=batches, upper_batches=batches)
    state = algo.init(y0)
    x = x0.clone().requires_grad_()
    opt = torch.optim.SGD([x], lr=0.1)
    algo.step(x, state)  # first call outside: lazy CUDA initialization may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            x.grad = algo.step(x, state)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x).all() and torch.isfinite(state.y).all()


@pytest.mark.parametrize("strategy", [bl.AmIGO, bl.StocBiO], ids=["amigo", "stocbio"])
def test_no_sync_in_stochastic_strategies_with_torch_optim(strategy):
    lower, f, batches, x0, y0 = _stochastic_problem("cuda")
    lower = bl.LowerProblem(lower.objective, constraint=lower.constraint,
                            solver=bl.TorchOptim(torch.optim.SGD, 4, batches=batches, lr=0.1, momentum=0.5))
    algo = strategy(batches, steps=4, step_size=0.3, residual=bl.ResidualCheck(step=0.1, batches=batches))
    x = x0.clone().requires_grad_()
    y = y0
    f(x, bl.solve(lower, x, y, algo, check_finite=False), batches()).backward()  # warm-up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            y = bl.solve(lower, x, y, algo, check_finite=False)
            f(x, y, batches()).backward()
            y = y.detach()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad).all() and algo.last_residual.ndim == 0


def test_no_sync_in_warm_started_cg():
    g, constraint, x0, init = _problem("cuda")
    lower = bl.LowerProblem(g, constraint=constraint, solver=bl.ProjectedGradient(0.2, 10))
    strategy = bl.Implicit(bl.CG(maxiter=5), warm_start=True)
    for _ in range(2):  # the second call warm-starts from the first's solution
        x = x0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ((bl.solve(lower, x, init, strategy, check_finite=False) - 0.1) ** 2).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert strategy.last_solution is not None and torch.isfinite(x.grad).all()


def test_defaults_sync_only_on_the_checked_solves():
    """solve's default check_finite skips the finiteness read on CUDA; Implicit's default ConvergenceCheck reads on
    solve 1 and solve 100, and nowhere in between."""
    g, constraint, x0, init = _problem("cuda")
    lower = bl.LowerProblem(g, constraint=constraint, solver=bl.ProjectedGradient(0.2, 10))
    strategy = bl.Implicit(bl.CG(maxiter=30))
    x = x0.clone().requires_grad_()
    ((bl.solve(lower, x, init, strategy) - 0.1) ** 2).sum().backward()  # solve 1: checked, syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2, 100):
            ((bl.solve(lower, x, init, strategy) - 0.1) ** 2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert strategy.solves == 99
