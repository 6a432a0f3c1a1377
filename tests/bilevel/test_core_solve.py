r"""bilevel.solve and value_and_hypergrad: bad input gets one clear exception that names the problem; NaN solutions;
strategy and solver argument checks; the functional form's zero hypergradient."""

from __future__ import annotations

import warnings

import pytest
import torch
from _quadratic import quadratic

import bilevel as bl


def _g():
    return quadratic(linear_term=False).g


def test_strategy_must_be_an_object():
    lower = bl.LowerProblem(_g(), solver=bl.GradientDescent(0.1, 3))
    with pytest.raises(TypeError, match="`strategy` must be a bilevel strategy object"):
        bl.solve(lower, torch.randn(3), torch.zeros(4), "implicit")
    with pytest.raises(TypeError, match="`strategy` must be a bilevel strategy object"):
        bl.solve(lower, torch.randn(3), torch.zeros(4), bl.Implicit)  # the class, not an instance
    with pytest.raises(TypeError, match="`lower` must be a bilevel.LowerProblem"):
        bl.solve(_g(), torch.randn(3), torch.zeros(4), bl.Implicit())


def test_non_scalar_objectives():
    lower = bl.LowerProblem(lambda x, y: y * x.sum(), solver=bl.GradientDescent(0.1, 3))
    for strategy in (bl.Implicit(), bl.Unrolled(), bl.Linearized(0.1), bl.FirstOrder()):
        with pytest.raises(ValueError, match=r"lower objective g\(x, y\) must return a scalar tensor, got \(4,\)"):
            bl.solve(lower, torch.ones(3, requires_grad=True), torch.zeros(4), strategy)
    lower = bl.LowerProblem(_g(), solver=bl.GradientDescent(0.1, 3))
    with pytest.raises(ValueError, match="upper objective must return a scalar tensor"):
        bl.value_and_hypergrad(lambda x, y: y, lower, torch.ones(3), torch.zeros(4), bl.Implicit())


@pytest.mark.parametrize("strategy", [bl.Implicit(), bl.Unrolled(), bl.FirstOrder()], ids=["implicit", "unrolled", "first"])
def test_nan_in_the_lower_solution(strategy):
    """Step 2 on a Hessian with eigenvalue 3 diverges (|1 - 2*3| = 5 per step): overflow, then NaN."""
    lower = bl.LowerProblem(_g(), solver=bl.GradientDescent(2.0, 600))
    with pytest.raises(FloatingPointError, match="lower solution contains NaN or Inf.*lower the solver's step size"):
        bl.solve(lower, torch.ones(3, requires_grad=True), torch.ones(4), strategy)
    # check_finite=False hands the NaN back instead
    y = bl.solve(lower, torch.ones(3), torch.ones(4), strategy, check_finite=False)
    assert not torch.isfinite(y).all()


def test_nan_from_the_objective():
    lower = bl.LowerProblem(lambda x, y: (torch.sqrt(y - 10.0) * x).sum(), solver=bl.GradientDescent(0.1, 2))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        bl.solve(lower, torch.ones(3), torch.zeros(3), bl.Linearized(0.1))


def test_missing_solver_and_bad_leaves():
    lower = bl.LowerProblem(_g())
    for strategy in (bl.Implicit(), bl.Unrolled(), bl.FirstOrder()):
        with pytest.raises(ValueError, match=r"has no solver \(LowerProblem\(..., solver=...\)\)"):
            bl.solve(lower, torch.randn(3), torch.zeros(4), strategy)
    lower = bl.LowerProblem(_g(), solver=bl.GradientDescent(0.1, 2))
    with pytest.raises(TypeError, match="every leaf of a variable tree must be a torch.Tensor; leaf 1 is float"):
        bl.solve(lower, (torch.randn(3), 2.0), torch.zeros(4), bl.Implicit())
    with pytest.raises(TypeError, match="lower variable must be floating point, got torch.int64"):
        bl.solve(lower, torch.randn(3), torch.zeros(4, dtype=torch.long), bl.Implicit())
    with pytest.raises(ValueError, match=r"lower variable \(init\) has no elements"):
        bl.solve(lower, torch.randn(3), torch.zeros(0), bl.Implicit())
    with pytest.raises(TypeError, match="value_and_hypergrad: the upper variable x must be floating point"):
        bl.value_and_hypergrad(lambda x, y: y.sum(), lower, torch.ones(3, dtype=torch.long), torch.zeros(4), bl.Implicit())


def test_argument_validation():
    checks = [
        (lambda: bl.Linearized(step=0.0), "Linearized: step must be > 0"),
        (lambda: bl.Linearized(step=0.1, lam=-1.0), "Linearized: lam must be > 0"),
        (lambda: bl.Unrolled(truncate=-1), "Unrolled: truncate must be >= 0"),
        (lambda: bl.Implicit(damping=-0.1), "Implicit: damping must be >= 0"),
        (lambda: bl.Implicit(damping=float("nan")), "Implicit: damping must be >= 0"),
        (lambda: bl.Implicit(mask_tol=-1.0), "Implicit: mask_tol must be >= 0"),
        (lambda: bl.Implicit(mask_tol=float("nan")), "Implicit: mask_tol must be >= 0"),
        (lambda: bl.GradientDescent(0.1, -1), "GradientDescent: steps must be an integer >= 1"),
        (lambda: bl.ProjectedGradient(0.1, 2.5), "ProjectedGradient: steps must be an integer >= 1"),
        (lambda: bl.SignedProjectedGradient(0.0, 3), "SignedProjectedGradient: step_size must be a finite number > 0"),
        (lambda: bl.Box(1.0, 0.0), "Box: lower > upper"),
        (lambda: bl.LInfBall(0.0, -0.5), "LInfBall: radius must be >= 0"),
    ]
    for make, msg in checks:
        with pytest.raises(ValueError, match=msg):
            make()


def test_solver_output_structure_differs_from_init():
    lower = bl.LowerProblem(lambda x, y: sum((t**2).sum() for t in y.values()) * x.sum(),
                            solver=bl.ClosedForm(lambda x: {"a": x.clone(), "c": x.clone()}))
    with pytest.raises(ValueError, match=r"lower solution returned by the solver \(compared with init\) has structure"):
        bl.solve(lower, torch.ones(2), {"a": torch.zeros(2), "b": torch.zeros(2)}, bl.Implicit())


def test_value_and_hypergrad_first_order_with_upper_independent_of_x_is_zero():
    x = torch.tensor([0.5, -1.0])
    lower = bl.LowerProblem(lambda x, y: 0.5 * ((y - x) ** 2).sum(), solver=bl.GradientDescent(0.5, 50))
    value, grad = bl.value_and_hypergrad(lambda x, y: (y**2).sum(), lower, x, torch.zeros(2), bl.FirstOrder())
    torch.testing.assert_close(value, (x**2).sum())
    assert torch.equal(grad, torch.zeros(2))


def _captured_x_problem(x_outer):
    """The classic mistake: g reads the upper variable from the enclosing scope, not from its first argument."""
    return lambda x, y: 0.5 * ((y - x_outer.detach()) ** 2).sum() + 0.1 * (y ** 4).sum()


@pytest.mark.parametrize("make", [bl.Implicit, bl.Unrolled, lambda: bl.Linearized(step=0.5)],
                         ids=["Implicit", "Unrolled", "Linearized"])
def test_a_lower_objective_that_ignores_x_is_reported(make):
    """A zero hypergradient through y* from a g without x: a HypergradientWarning naming the cause; the same g
    written with its argument (and MAML's g without x but init = x, under Unrolled) is silent."""
    strategy = make()  # a fresh object: the first-solve check is per object
    x = torch.tensor([0.5, -1.0], requires_grad=True)
    bad = bl.LowerProblem(_captured_x_problem(x), solver=bl.GradientDescent(0.3, 40))
    with pytest.warns(bl.HypergradientWarning, match=r"does not (depend on|use) x.*first argument"):
        (bl.solve(bad, x, torch.zeros(2), strategy) ** 2).sum().backward()
    assert x.grad is None or torch.equal(x.grad, torch.zeros(2))
    good = bl.LowerProblem(lambda x, y: 0.5 * ((y - x) ** 2).sum() + 0.1 * (y ** 4).sum(),
                           solver=bl.GradientDescent(0.3, 40))
    fresh = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.HypergradientWarning)
        x.grad = None
        (bl.solve(good, x, torch.zeros(2), fresh) ** 2).sum().backward()
        assert x.grad.abs().min() > 0
        if isinstance(strategy, bl.Unrolled):  # MAML: x enters through the start only
            maml = bl.LowerProblem(lambda x, y: 0.5 * (y ** 2).sum(), solver=bl.GradientDescent(0.3, 5))
            bl.solve(maml, x, x, bl.Unrolled()).sum().backward()
        bl.solve(bad, x, torch.zeros(2), bl.FirstOrder())  # independent of x by design
        identity = bl.LowerProblem(lambda x, y: 0.5 * ((y - x) ** 2).sum(), solver=bl.ClosedForm(lambda x: x))
        bl.solve(identity, x, torch.zeros(2), fresh)  # y* is x itself: a leaf, reached at once
    if not isinstance(strategy, bl.Implicit):  # the first-solve mark is not a field: equality is unchanged
        assert strategy == make()


def test_value_and_hypergrad_treats_x_passed_as_init_as_one_variable():
    """MAML through the functional form, with a tree and with a module: the same meta-gradient as solve()."""
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lower = bl.LowerProblem(lambda x, w: ((w - 3.0) ** 2).sum(), solver=bl.GradientDescent(0.1, 5))
    upper = lambda x, w: (w ** 2).sum()  # noqa: E731
    _, got = bl.value_and_hypergrad(upper, lower, theta, theta, bl.Unrolled())
    live = theta.clone().requires_grad_()
    upper(live, bl.solve(lower, live, live, bl.Unrolled())).backward()
    torch.testing.assert_close(got, live.grad, rtol=1e-14, atol=0)
    assert got.abs().min() > 0.1
    net = torch.nn.Linear(2, 1).double()
    g = lambda p, w: sum(((w[k] - 1.0) ** 2).sum() for k in w)  # noqa: E731
    f = lambda p, w: sum((w[k] ** 2).sum() for k in w)  # noqa: E731
    module_lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.1, 5))
    _, by_module = bl.value_and_hypergrad(f, module_lower, net, net, bl.Unrolled())
    tree = {k: v.detach().clone() for k, v in net.named_parameters()}
    _, by_tree = bl.value_and_hypergrad(f, module_lower, tree, tree, bl.Unrolled())
    for k in tree:
        torch.testing.assert_close(by_module[k], by_tree[k], rtol=1e-14, atol=0)
        assert by_tree[k].abs().min() > 0.1

