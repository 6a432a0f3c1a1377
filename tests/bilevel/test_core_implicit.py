r"""The implicit strategy's custom autograd rule: gradcheck, damping, masks and diagnostics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl


def _smooth_problem(n: int = 5, m: int = 3, constraint=None):
    r"""g(x, y) = 0.5 y'Hy + sum softplus(y - C'x) + 0.1 sum x^2 y: strongly convex in y (Hessian in
    [H, H + 0.25 I], H's spectrum in [1, 2]), nonlinear in x; gradient descent with step 0.4 contracts
    by 0.6 per step, so 80 steps reach machine precision from any start."""
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    H = Q @ torch.diag(torch.linspace(1.0, 2.0, n)) @ Q.T
    C = torch.randn(m, n)

    def g(x, y):
        return 0.5 * y @ H @ y + F.softplus(y - C.T @ x).sum() + 0.1 * (x**2).sum() * y.sum()

    solver = bl.GradientDescent(0.4, 80) if constraint is None else bl.ProjectedGradient(0.4, 80)
    return bl.LowerProblem(g, constraint=constraint, solver=solver), H, C


@pytest.mark.parametrize("linear_solver", [bl.DenseSolve(), bl.CG(maxiter=40, tol=0.0)], ids=["dense", "cg"])
def test_gradcheck_implicit_unconstrained(linear_solver):
    lower, _, _ = _smooth_problem()
    init = torch.zeros(5)
    x = torch.randn(3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx: bl.solve(lower, xx, init, bl.Implicit(linear_solver)), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_implicit_box_and_tuple_tree():
    """Two lower leaves (a tuple), one boxed with a strictly active coordinate, and two upper leaves."""
    n, m = 5, 3
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    H = Q @ torch.diag(torch.linspace(1.0, 2.0, n)) @ Q.T
    C, E = torch.randn(m, n), torch.randn(2, 2)

    def g(x, y):
        xa, xb = x
        ya, yb = y
        return (0.5 * ya @ H @ ya + F.softplus(ya - C.T @ xa).sum() + 0.5 * (yb**2).sum()
                + torch.cos(xb) @ E @ yb + 0.2 * ya[:2] @ yb - 3.0 * ya[0])

    c_upper = torch.tensor([0.05, 10.0, 10.0, 10.0, 10.0])
    lower = bl.LowerProblem(g, constraint=(bl.Box(-10.0, c_upper), None), solver=bl.ProjectedGradient(0.4, 90))
    init = (torch.zeros(n), torch.zeros(2))
    x = (torch.tensor([1.0, -0.5, 0.3]).requires_grad_(), torch.randn(2, requires_grad=True))
    ya, _ = bl.solve(lower, x, init, bl.FirstOrder())
    free = lower.free_mask([ya, torch.zeros(2)])[0]
    assert not bool(free[0]) and bool(free[1:].all()), "coordinate 0 must be active, the others free"
    _, gy = lower.value_and_grad(x, bl.solve(lower, x, init, bl.FirstOrder()))
    assert float(gy[0][0]) < -1e-2  # strict complementarity: the active coordinate is pushed outward

    def fn(xa, xb):
        return bl.solve(lower, (xa, xb), init, bl.Implicit(bl.DenseSolve()))

    assert torch.autograd.gradcheck(fn, x, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_damping_matches_closed_form():
    n, m, rho = 4, 3, 0.7
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    H = Q @ torch.diag(torch.linspace(1.0, 3.0, n)) @ Q.T
    C = torch.randn(m, n)
    lower = bl.LowerProblem(lambda x, y: 0.5 * y @ H @ y + x @ C @ y,
                            solver=bl.ClosedForm(lambda x: -torch.linalg.solve(H, C.T @ x)))
    t = torch.randn(n)
    for linear_solver in (bl.CG(maxiter=30), bl.DenseSolve()):
        x = torch.randn(m, requires_grad=True)
        y = bl.solve(lower, x, torch.zeros(n), bl.Implicit(linear_solver, damping=rho))
        ((y - t) ** 2).sum().backward()
        oracle = -C @ torch.linalg.solve(H + rho * torch.eye(n), 2 * (y.detach() - t))
        assert torch.allclose(x.grad, oracle, rtol=1e-10, atol=1e-12)
    # DenseSolve's own ridge is the same regularization
    x = torch.randn(m, requires_grad=True)
    y = bl.solve(lower, x, torch.zeros(n), bl.Implicit(bl.DenseSolve(ridge=rho)))
    ((y - t) ** 2).sum().backward()
    oracle = -C @ torch.linalg.solve(H + rho * torch.eye(n), 2 * (y.detach() - t))
    assert torch.allclose(x.grad, oracle, rtol=1e-10, atol=1e-12)


def test_mask_tol_treats_near_bound_coordinates_as_active():
    """y* is 1e-9 inside the upper bound on coordinate 0: free with mask_tol=0, active with mask_tol=1e-6."""
    n, m = 3, 2
    H = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    C = torch.randn(m, n)
    y_fixed = torch.tensor([1.0 - 1e-9, 0.2, -0.3])
    lower = bl.LowerProblem(lambda x, y: 0.5 * y @ H @ y + x @ C @ y, constraint=bl.Box(-1.0, 1.0),
                            solver=bl.ClosedForm(lambda x: y_fixed.clone()))
    grads = {}
    for tol in (0.0, 1e-6):
        x = torch.randn(m, generator=torch.Generator().manual_seed(3)).requires_grad_()
        y = bl.solve(lower, x, torch.zeros(n), bl.Implicit(bl.DenseSolve(), mask_tol=tol))
        y.sum().backward()
        grads[tol] = x.grad
    full = -C @ torch.linalg.solve(H, torch.ones(n))
    reduced = -C[:, 1:] @ torch.linalg.solve(H[1:, 1:], torch.ones(n - 1))
    assert torch.allclose(grads[0.0], full, rtol=1e-12)
    assert torch.allclose(grads[1e-6], reduced, rtol=1e-12)


def test_last_info_after_cg_and_neumann():
    lower, _, _ = _smooth_problem()
    for linear_solver, bound in ((bl.CG(maxiter=30), 1e-9), (bl.Neumann(steps=200, alpha=0.4), 1e-9),
                                 (bl.Neumann(steps=2, alpha=0.4), 1e-3)):
        strategy = bl.Implicit(linear_solver)
        x = torch.randn(3, requires_grad=True)
        (bl.solve(lower, x, torch.zeros(5), strategy) ** 2).sum().backward()
        rr = float(strategy.last_info.relative_residual)
        assert (rr < bound) if bound < 1e-3 else (rr > bound)  # a 2-term series is far from converged
    # a few CG iterations on a 5-dim problem: the relative residual tells it is not converged
    strategy = bl.Implicit(bl.CG(maxiter=1))
    x = torch.randn(3, requires_grad=True)
    (bl.solve(lower, x, torch.zeros(5), strategy) ** 2).sum().backward()
    assert float(strategy.last_info.relative_residual) > 1e-4


def test_implicit_ignores_init_gradient_and_unused_x_leaf():
    """Gradients do not flow into init; an x leaf that g does not use gets a zero gradient."""
    lower = bl.LowerProblem(lambda x, y: 0.5 * ((y - x["a"]) ** 2).sum(), solver=bl.GradientDescent(1.0, 1))
    x = {"a": torch.randn(3, requires_grad=True), "unused": torch.randn(2, requires_grad=True)}
    init = torch.randn(3, requires_grad=True)
    y = bl.solve(lower, x, init, bl.Implicit())
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x["a"].grad, torch.arange(3.0))
    assert torch.equal(x["unused"].grad, torch.zeros(2))
    assert init.grad is None


def test_no_grad_solve_builds_no_graph():
    lower, _, _ = _smooth_problem()
    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        for strategy in (bl.Implicit(), bl.Unrolled(), bl.Linearized(0.4), bl.FirstOrder()):
            assert not bl.solve(lower, x, torch.zeros(5), strategy).requires_grad


def _second_order_problem():
    n, m = 4, 3
    H = torch.diag(torch.linspace(1.0, 3.0, n))
    C = torch.randn(m, n)
    lower = bl.LowerProblem(lambda x, y: 0.5 * y @ H @ y + (x**2) @ C @ y,
                            solver=bl.ClosedForm(lambda x: -torch.linalg.solve(H, C.T @ x**2)))
    return lower, n


def test_double_backward_under_plain_autograd_raises():
    """create_graph=True would otherwise return a hypergradient without its dependence on x (silently wrong)."""
    lower, n = _second_order_problem()
    x = torch.randn(3, requires_grad=True)
    F = (bl.solve(lower, x, torch.zeros(n), bl.Implicit(bl.DenseSolve())) ** 2).sum() + (x**3).sum()
    with pytest.raises(RuntimeError, match=r"Implicit: double backward \(create_graph=True\).*not supported"):
        torch.autograd.grad(F, x, create_graph=True)


@pytest.mark.parametrize("linear_solver", [bl.DenseSolve(), bl.CG(maxiter=10, tol=0.0)], ids=["dense", "cg"])
def test_second_derivative_under_torch_func(linear_solver):
    """Under torch.func the implicit backward is differentiable: the Hessian of F matches autograd through
    the closed-form solution (y* = -H^-1 C' x^2)."""
    lower, n = _second_order_problem()
    x0 = torch.randn(3)

    def F(strategy):
        return lambda x: (bl.solve(lower, x, torch.zeros(n), strategy) ** 2).sum() + (x**3).sum()

    hess = torch.func.jacrev(torch.func.grad(F(bl.Implicit(linear_solver))))(x0)
    true = torch.autograd.functional.hessian(F(bl.Unrolled()), x0)  # autograd through the closed form
    assert torch.allclose(hess, true, rtol=1e-9, atol=1e-10)
    assert (true - torch.diag(6 * x0)).abs().max() > 1e-2  # the implicit part contributes


def test_warm_started_implicit_converges_to_the_exact_system_solution_with_two_cg_steps_per_solve():
    """CG(maxiter=2) cannot solve a 5x5 system in one call; warm-started across calls it converges."""
    lower, H, C = _smooth_problem()
    init, x = torch.zeros(5), torch.randn(3)
    strategy = bl.Implicit(bl.CG(maxiter=2, tol=0.0), warm_start=True)
    cold = bl.Implicit(bl.CG(maxiter=2, tol=0.0))
    t = torch.randn(5)
    for _ in range(8):
        xx = x.clone().requires_grad_()
        y = bl.solve(lower, xx, init, strategy)
        (y * t).sum().backward()
    lin_H = torch.autograd.functional.hessian(lambda yy: lower.objective(x, yy), y.detach())
    exact = torch.linalg.solve(lin_H, t)
    assert torch.allclose(strategy.last_solution, exact, rtol=1e-10, atol=1e-12)
    xx = x.clone().requires_grad_()
    (bl.solve(lower, xx, init, cold) * t).sum().backward()
    assert float(cold.last_info.relative_residual) > 1e-3  # a single cold call is far from it


def test_warm_start_under_torch_func_grad_converges_and_is_refused_under_vmap():
    """Under torch.func.grad the kept solution is a plain tensor, so warm starts chain across calls as under
    autograd; under vmap (over x, or over data that g captures) one state cannot serve every task: a ValueError,
    and the state from before is kept."""
    lower, H, C = _smooth_problem()
    init, x = torch.zeros(5), torch.randn(3)
    t = torch.randn(5)
    strategy = bl.Implicit(bl.CG(maxiter=2, tol=0.0), warm_start=True)
    F = lambda xx: (bl.solve(lower, xx, init, strategy) * t).sum()
    for _ in range(8):
        got = torch.func.grad(F)(x)
    exact = torch.func.grad(lambda xx: (bl.solve(lower, xx, init, bl.Implicit(bl.DenseSolve())) * t).sum())(x)
    torch.testing.assert_close(got, exact, rtol=1e-8, atol=1e-10)
    kept = strategy.last_solution
    assert not torch._C._functorch.is_functorch_wrapped_tensor(kept)
    with pytest.raises(ValueError, match=r"warm_start=True\) under vmap"):
        torch.func.vmap(torch.func.grad(F))(torch.randn(4, 3))
    targets = torch.randn(4, 5)
    per_task = lambda tt: torch.func.grad(lambda xx: (bl.solve(lower, xx, init, strategy) * tt).sum())(x)
    with pytest.raises(ValueError, match=r"warm_start=True\) under vmap"):  # x shared, the data batched
        torch.func.vmap(per_task)(targets)
    with pytest.raises(ValueError, match=r"warm_start=True\) under vmap"):  # jacrev: only the backward is batched
        torch.func.jacrev(lambda xx: bl.solve(lower, xx, init, strategy))(x)
    assert strategy.last_solution is kept
    torch.testing.assert_close(torch.func.grad(F)(x), exact, rtol=1e-8, atol=1e-10)  # still usable


def test_implicit_residual_diagnostic_is_stored_and_checked():
    lower, _, _ = _smooth_problem()
    x = torch.randn(3, requires_grad=True)
    converged = bl.Implicit(residual=bl.ResidualCheck(step=0.4, tol=1e-8))
    y = bl.solve(lower, x, torch.zeros(5), converged)
    assert float(converged.last_residual) < 1e-10
    few = bl.LowerProblem(lower.objective, solver=bl.GradientDescent(0.4, 2))
    with pytest.raises(bl.LowerSolveError, match="not converged"):
        bl.solve(few, x, torch.zeros(5), bl.Implicit(residual=bl.ResidualCheck(step=0.4, tol=1e-3)))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
