r"""The default check of an implicit hypergradient (:class:`bilevel.ConvergenceCheck`): it warns on iMAML's
unconverged setting (a ReLU MLP, inner step above 2/L), stays silent when the lower problem is solved, and
costs nothing between checked solves."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl


def _sinusoid_problem(activation, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), activation(), torch.nn.Linear(40, 40), activation(),
                              torch.nn.Linear(40, 1)).double()
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}

    def task():
        amp, phase = torch.empty(1).uniform_(0.1, 5.0), torch.empty(1).uniform_(0.0, torch.pi)
        x = torch.empty(20, 1).uniform_(-5.0, 5.0)
        return x[:10], amp * torch.sin(x[:10] - phase), x[10:], amp * torch.sin(x[10:] - phase)

    def model(p, x):
        return torch.func.functional_call(net, p, (x,))

    return theta, task, model


def _imaml_steps(activation, step, steps, n_outer, strategy):
    theta, task, model = _sinusoid_problem(activation)
    opt = torch.optim.Adam(theta.values(), 1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n_outer):
            xs, ys, xq, yq = task()

            def g(th, p, xs=xs, ys=ys):
                return 0.5 * ((model(p, xs) - ys) ** 2).mean() + sum(((p[k] - th[k]) ** 2).sum() for k in p)

            lower = bl.LowerProblem(g, solver=bl.GradientDescent(step, steps))
            p = bl.solve(lower, theta, {k: v.detach() for k, v in theta.items()}, strategy)
            ((model(p, xq) - yq) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
    return [w for w in caught if issubclass(w.category, bl.HypergradientWarning)]


def test_the_unconverged_imaml_setting_warns_within_ten_outer_steps():
    """ReLU 1-40-40-1, inner step 0.05: gradient descent does not settle, the warning names the residual."""
    found = _imaml_steps(torch.nn.ReLU, 0.05, 100, 10, bl.Implicit(bl.CG(maxiter=10)))
    assert found, "no HypergradientWarning in 10 outer steps"
    text = str(found[0].message)
    assert "residual" in text and "step" in text and "check=None" in text


def test_a_solved_lower_problem_is_silent():
    """tanh MLP, inner step 0.05 (below 2/L) for 300 steps: the residual falls by > 1e4, CG converges."""
    strategy = bl.Implicit(bl.CG(maxiter=30), check=bl.ConvergenceCheck(every=1))
    assert _imaml_steps(torch.nn.Tanh, 0.05, 300, 3, strategy) == []
    assert float(strategy.last_residual) < 1e-6


def test_a_stalled_warm_start_warns_though_its_residual_is_small_against_a_cold_start():
    """Weakly regularized logistic regression on separable data: 3000 steps of gradient descent, then a checked
    solve of 100 more barely lowers the residual (about 0.9x). It is 5e-4 of a zero start's residual, yet the
    hypergradient is 6 % off the exact one (Newton's method): the check compares with the solve's own start, so
    a warm start that stalls is reported, not excused by a cold start's scale."""
    torch.manual_seed(0)
    X = torch.randn(200, 8, dtype=torch.float64)
    labels = (X @ torch.randn(8, 3, dtype=torch.float64)).argmax(1)
    Xv, lv = torch.randn(50, 8, dtype=torch.float64), torch.randint(0, 3, (50,))
    g = lambda lam, W: torch.nn.functional.cross_entropy(X @ W, labels) + 0.5 * lam.exp() * (W ** 2).sum()
    f = lambda lam, W: torch.nn.functional.cross_entropy(Xv @ W, lv)
    lam, zero = torch.tensor(-8.0, dtype=torch.float64), torch.zeros(8, 3, dtype=torch.float64)
    warm = bl.GradientDescent(1.0, 3000).run(bl.LowerProblem(g, solver=bl.GradientDescent(1.0, 1)), lam, zero)
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(1.0, 100))
    y = lower.solver.run(lower, lam, warm)
    r = lambda w: float(bl.lower_residual(lower, lam, w, 1.0))
    assert r(y) < 1e-3 * r(zero) and r(y) > 0.5 * r(warm)
    with pytest.warns(bl.HypergradientWarning, match="not solved"):
        _, got = bl.value_and_hypergrad(f, lower, lam, warm, bl.Implicit(bl.CG(maxiter=60)))
    newton = lambda W: W - torch.linalg.solve(torch.func.hessian(lambda v: g(lam, v.reshape(8, 3)))(W.reshape(-1)),
                                              torch.func.grad(lambda v: g(lam, v.reshape(8, 3)))(W.reshape(-1))
                                              ).reshape(8, 3)
    exact_y = y
    for _ in range(20):
        exact_y = newton(exact_y)
    assert r(exact_y) < 1e-12
    exact_lower = bl.LowerProblem(g, solver=bl.ClosedForm(lambda _: exact_y))
    _, exact = bl.value_and_hypergrad(f, exact_lower, lam, zero, bl.Implicit(bl.DenseSolve()))
    assert abs(float(got - exact)) > 0.02 * abs(float(exact))


def test_check_none_is_silent_and_error_raises():
    assert _imaml_steps(torch.nn.ReLU, 0.05, 100, 2, bl.Implicit(bl.CG(maxiter=10), check=None)) == []
    with pytest.raises(bl.LowerSolveError, match="not solved"):
        _imaml_steps(torch.nn.ReLU, 0.05, 100, 1, bl.Implicit(bl.CG(maxiter=10), check=bl.ConvergenceCheck(error=True)))


def test_negative_curvature_is_named():
    """An indefinite lower Hessian (a saddle of g, reached exactly by a closed form): CG's curvature record."""
    H = torch.diag(torch.tensor([2.0, 1.0, -0.5]))
    lower = bl.LowerProblem(lambda x, y: 0.5 * y @ H @ y - x @ y, solver=bl.ClosedForm(lambda x: torch.linalg.solve(H, x)))
    x = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    with pytest.warns(bl.HypergradientWarning, match="non-positive curvature.*smallest eigenvalue.*damping must exceed"):
        bl.solve(lower, x, torch.zeros(3), bl.Implicit(bl.CG(maxiter=3))).sum().backward()


def test_only_the_first_and_every_nth_solve_are_checked(monkeypatch):
    calls = []
    original = bl.ConvergenceCheck.lower
    monkeypatch.setattr(bl.ConvergenceCheck, "lower", lambda self, *a: calls.append(1) or original(self, *a))
    lower = bl.LowerProblem(lambda x, y: 0.5 * ((y - x) ** 2).sum(), solver=bl.GradientDescent(0.5, 60))
    strategy = bl.Implicit(check=bl.ConvergenceCheck(every=4))
    for _ in range(9):
        bl.solve(lower, torch.ones(2, requires_grad=True), torch.zeros(2), strategy)
    assert len(calls) == 3 and strategy.solves == 9  # solves 1, 4 and 8


@pytest.mark.parametrize("bad", [dict(every=0), dict(every=2.5), dict(rtol=-1.0), dict(atol=float("nan")),
                                 dict(linear_rtol=float("inf")), dict(step=0.0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="ConvergenceCheck"):
        bl.ConvergenceCheck(**bad)
    with pytest.raises(TypeError, match="check must be"):
        bl.Implicit(check=0.01)


def test_the_curvature_message_accounts_for_damping():
    """CG measures H + damping I: with H = diag(-2, 1, 3) and damping 1 the bound on H's eigenvalue is c - 1."""
    H = torch.diag(torch.tensor([-2.0, 1.0, 3.0]))
    lower = bl.LowerProblem(lambda x, y: 0.5 * y @ H @ y - x @ y, solver=bl.ClosedForm(lambda x: torch.linalg.solve(H, x)))
    x = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    with pytest.warns(bl.HypergradientWarning) as record:
        bl.solve(lower, x, torch.zeros(3), bl.Implicit(bl.CG(maxiter=3), damping=1.0)).sum().backward()
    text = " ".join(str(w.message) for w in record)
    low = float(text.split("p'(H + damping I)p/p'p = ")[1].split(",")[0].split(" ")[0])
    assert -1.0 <= low <= 0  # a Rayleigh quotient of H + I, whose smallest eigenvalue is -1
    assert f"at most {low - 1.0:.3g}" in text and f"damping must exceed {1.0 - low:.3g}" in text


@pytest.mark.parametrize("linear_solver,remedy", [
    (bl.Neumann(50, alpha=100.0), r"Neumann series grew.*alpha=100 must be below 2/lambda_max"),
    (bl.Neumann(2, alpha=0.1), r"Raise Neumann's steps \(now 2\)"),
    (bl.CG(maxiter=1), r"Raise CG's maxiter \(now 1\)"),
    (bl.CG(maxiter=50, tol=0.5), r"CG's tol=0.5 stops it above linear_rtol=0.01: lower tol"),
], ids=["neumann-diverges", "neumann-short", "cg-short", "cg-loose-tol"])
def test_the_linear_system_message_names_the_knob_that_failed(linear_solver, remedy):
    """A ridge lower problem solved to 1e-13: the linear solve is what failed, and the message says which knob."""
    torch.manual_seed(0)
    X, t = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    g = lambda lam, w: 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (lam * w * w).sum()
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 2000))
    lam = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    with pytest.warns(bl.HypergradientWarning, match=remedy) as record:
        bl.value_and_hypergrad(lambda lam, w: w.sum(), lower, lam, torch.zeros(5, dtype=torch.float64),
                               bl.Implicit(linear_solver))
    assert not any("Solve the lower problem further" in str(w.message) for w in record)


def test_implicit_over_a_batch_drawing_solver_needs_a_full_objective():
    g = lambda x, y, batch: ((y - x) ** 2).mean()  # noqa: E731
    solver = bl.TorchOptim(torch.optim.SGD, 3, batches=lambda: torch.arange(2), lr=0.1)
    with pytest.raises(TypeError, match="default batch"):
        bl.solve(bl.LowerProblem(g, solver=solver), torch.ones(2, requires_grad=True), torch.zeros(2), bl.Implicit())
    full = bl.LowerProblem(lambda x, y, batch=None: ((y - x) ** 2).mean(), solver=solver)  # the documented form
    bl.solve(full, torch.ones(2, requires_grad=True), torch.zeros(2), bl.Implicit(check=None)).sum().backward()
