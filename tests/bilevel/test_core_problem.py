r"""bilevel.LowerProblem: constraint trees matched by structure, shape checks, argument types, projection,
free masks and mini-batch binding (``on``)."""

from __future__ import annotations

import pytest
import torch
from _quadratic import quadratic

import bilevel as bl
from bilevel._tree import leaves


def _g():
    return quadratic(linear_term=False).g


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


def test_lower_problem_rejects_a_solver_or_objective_of_the_wrong_kind():
    with pytest.raises(TypeError, match="LowerProblem: the solver must provide steps and run"):
        bl.LowerProblem(lambda x, y: (x * y).sum(), solver="gradient descent")
    with pytest.raises(TypeError, match="LowerProblem: the solver must provide"):
        bl.LowerProblem(lambda x, y: (x * y).sum(), solver=bl.CG())  # a linear solver is not a lower solver
    with pytest.raises(TypeError, match="LowerProblem: the objective must be a function g\\(x, y\\), got Tensor"):
        bl.LowerProblem(torch.zeros(3))


def test_dict_constraint_is_matched_by_key_not_order():
    lower = bl.LowerProblem(lambda x, y: ((y["a"] - x) ** 2).sum() + ((y["b"] - x) ** 2).sum(),
                            constraint={"b": None, "a": bl.Box(-1.0, 1.0)}, solver=bl.ProjectedGradient(0.25, 50))
    y = bl.solve(lower, torch.tensor([3.0]), {"a": torch.zeros(1), "b": torch.zeros(1)}, bl.FirstOrder())
    assert torch.allclose(y["a"], torch.tensor([1.0])) and torch.allclose(y["b"], torch.tensor([3.0]))


def test_project_and_free_mask_follow_the_constraint_tree():
    lower = bl.LowerProblem(lambda x, y: x * (y["a"].sum() + y["b"].sum()), constraint={"a": bl.Box(-1.0, 1.0), "b": None})
    y = {"a": torch.tensor([-2.0, 0.5, 1.0]), "b": torch.tensor([5.0, -7.0])}
    p = lower.project(y)
    assert torch.equal(p["a"], torch.tensor([-1.0, 0.5, 1.0])) and torch.equal(p["b"], y["b"])
    flat, spec = leaves(p)
    masks = dict(zip(spec.context, lower.free_mask(flat, 0.0, spec)))
    assert masks["a"].tolist() == [False, True, False] and masks["b"].tolist() == [True, True]
    masks = dict(zip(spec.context, lower.free_mask(flat, 0.6, spec)))  # 0.5 is 0.5 inside: not free at tol 0.6
    assert masks["a"].tolist() == [False, False, False]
    assert bl.LowerProblem(lambda x, y: y.sum()).free_mask([torch.zeros(2)]) is None


def test_on_binds_one_batch():
    seen = []

    def g(x, y, batch):
        seen.append(batch)
        return ((y - x * batch) ** 2).sum()

    lower = bl.LowerProblem(g, constraint=bl.Box(-1.0, 1.0), solver=bl.ProjectedGradient(0.25, 3))
    bound = lower.on(torch.tensor([2.0, 3.0]))
    assert bound.constraint is lower.constraint and bound.solver is lower.solver
    value, grad = bound.value_and_grad(torch.tensor(0.5), torch.zeros(2))
    assert float(value) == 1.0 + 2.25 and torch.equal(grad, torch.tensor([-2.0, -3.0]))
    assert torch.equal(seen[-1], torch.tensor([2.0, 3.0]))
