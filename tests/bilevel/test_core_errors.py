r"""Bad input gets one clear exception that names the problem."""

from __future__ import annotations

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


def test_gradient_descent_on_a_constrained_problem():
    lower = bl.LowerProblem(_g(), constraint=bl.Box(-1.0, 1.0), solver=bl.GradientDescent(0.1, 3))
    for strategy in (bl.Implicit(), bl.Unrolled(), bl.FirstOrder()):
        with pytest.raises(ValueError, match="GradientDescent: the lower problem has a constraint; use ProjectedGradient"):
            bl.solve(lower, torch.randn(3), torch.zeros(4), strategy)


def test_constraint_shape_mismatch():
    lower = bl.LowerProblem(_g(), constraint=bl.Box(torch.zeros(3), 1.0), solver=bl.ProjectedGradient(0.1, 3))
    with pytest.raises(ValueError, match=r"lower bound of shape \(3,\) does not broadcast to the variable's shape \(4,\)"):
        bl.solve(lower, torch.randn(3), torch.zeros(4), bl.Implicit())
    per_sample = bl.LInfBall(0.0, 0.1) & bl.Box(-torch.rand(2, 4), 1.0)
    lower = bl.LowerProblem(_g(), constraint=per_sample, solver=bl.ProjectedGradient(0.1, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 4\) does not broadcast"):
        bl.solve(lower, torch.randn(3), torch.zeros(4), bl.Linearized(0.1))


def test_constraint_tree_mismatch():
    g = lambda x, y: sum((t**2).sum() for t in y.values()) * x.sum()  # noqa: E731
    init = {"a": torch.zeros(2), "b": torch.zeros(3)}
    cases = [({"a": bl.Box(0.0, 1.0), "c": None},
              "constraint tree at the root has keys 'a', 'c' but the lower variable has keys 'a', 'b'"),
             ((bl.Box(0.0, 1.0), None), "constraint tree at the root is a tuple but the lower variable has keys 'a', 'b'"),
             ({"a": (bl.Box(0.0, 1.0),), "b": None},
              r"constraint tree has a tuple at the root\['a'\] where the lower variable has a tensor")]
    for ctree, msg in cases:
        lower = bl.LowerProblem(g, constraint=ctree, solver=bl.ProjectedGradient(0.1, 2))
        with pytest.raises(ValueError, match=msg):
            bl.solve(lower, torch.ones(1), init, bl.FirstOrder())
    lower = bl.LowerProblem(lambda x, y: (y[0] ** 2).sum() * x.sum(), constraint=(None, None, None),
                            solver=bl.ProjectedGradient(0.1, 2))
    with pytest.raises(ValueError, match="has 3 entries but the lower variable has 2 entries"):
        bl.solve(lower, torch.ones(1), (torch.zeros(2), torch.zeros(2)), bl.FirstOrder())


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


def test_argument_validation():
    checks = [
        (lambda: bl.Linearized(step=0.0), "Linearized: step must be > 0"),
        (lambda: bl.Linearized(step=0.1, lam=-1.0), "Linearized: lam must be > 0"),
        (lambda: bl.Unrolled(truncate=-1), "Unrolled: truncate must be >= 0"),
        (lambda: bl.Implicit(damping=-0.1), "Implicit: damping must be >= 0"),
        (lambda: bl.Implicit(damping=float("nan")), "Implicit: damping must be >= 0"),
        (lambda: bl.Implicit(mask_tol=-1.0), "Implicit: mask_tol must be >= 0"),
        (lambda: bl.Implicit(mask_tol=float("nan")), "Implicit: mask_tol must be >= 0"),
        (lambda: bl.GradientDescent(0.1, -1), "GradientDescent: steps must be a non-negative integer"),
        (lambda: bl.ProjectedGradient(0.1, 2.5), "ProjectedGradient: steps must be a non-negative integer"),
        (lambda: bl.SignedProjectedGradient(0.0, 3), "SignedProjectedGradient: step_size must be > 0"),
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


def test_lower_problem_rejects_a_solver_or_objective_of_the_wrong_kind():
    with pytest.raises(TypeError, match="LowerProblem: the solver must provide steps and run"):
        bl.LowerProblem(lambda x, y: (x * y).sum(), solver="gradient descent")
    with pytest.raises(TypeError, match="LowerProblem: the solver must provide"):
        bl.LowerProblem(lambda x, y: (x * y).sum(), solver=bl.CG())  # a linear solver is not a lower solver
    with pytest.raises(TypeError, match="LowerProblem: the objective must be a function g\\(x, y\\), got Tensor"):
        bl.LowerProblem(torch.zeros(3))
