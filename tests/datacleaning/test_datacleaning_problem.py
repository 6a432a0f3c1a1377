"""The hypergradient of the weight logits on a tiny linear problem, in float64, against finite differences."""

import pytest
import torch

import bilevel as bl
from applications.datacleaning.data import CleaningData
from applications.datacleaning.models import build_model
from applications.datacleaning.problem import DataCleaning


def tiny_problem(n=12, d=3, k=3, mu=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 1, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=gen)
    xv = torch.randn(8, 1, 1, d, generator=gen, dtype=torch.float64)
    yv = torch.randint(0, k, (8,), generator=gen)
    data = CleaningData(x, y, y.clone(), torch.zeros(n, dtype=torch.bool), xv, yv, xv, yv, k)
    model, theta0 = build_model("linear", (1, 1, d), k, seed)
    return DataCleaning(data, model, mu), {k_: v.double() for k_, v in theta0.items()}


def exact_lower(problem, theta0):
    # strongly convex (mu = 1, L < 1.5 on this data): 80 gradient steps of 0.6 converge to machine precision
    return bl.LowerProblem(problem.lower, solver=bl.GradientDescent(0.6, 80))


def validation_at_solution(problem, theta0, w):
    lower = exact_lower(problem, theta0)
    theta = lower.solver.run(lower, w, theta0)
    return problem.upper(w, theta)


def test_implicit_hypergradient_of_the_weights_matches_finite_differences():
    problem, theta0 = tiny_problem()
    w = torch.linspace(-1.0, 1.5, 12, dtype=torch.float64).requires_grad_()
    lower = exact_lower(problem, theta0)
    theta = bl.solve(lower, w, theta0, bl.Implicit(bl.DenseSolve()))
    _, residual = lower.value_and_grad(w.detach(), theta)
    assert max(float(r.abs().max()) for r in residual.values()) < 1e-12
    problem.upper(w, theta).backward()
    h = 1e-5
    fd = torch.empty(12, dtype=torch.float64)
    for i in range(12):
        e = torch.zeros(12, dtype=torch.float64)
        e[i] = h
        fd[i] = (validation_at_solution(problem, theta0, w.detach() + e)
                 - validation_at_solution(problem, theta0, w.detach() - e)) / (2 * h)
    assert float(fd.abs().max()) > 1e-3  # a nontrivial gradient
    torch.testing.assert_close(w.grad, fd, rtol=1e-6, atol=1e-9)


def test_lower_objective_is_the_sigmoid_weighted_mean_plus_weight_decay():
    problem, theta0 = tiny_problem()
    theta = {k: torch.randn_like(v) for k, v in theta0.items()}
    w = torch.randn(12, dtype=torch.float64)
    logits = problem.data.x_train.flatten(1) @ theta["linear.weight"].T + theta["linear.bias"]
    ce = -torch.log_softmax(logits, 1)[torch.arange(12), problem.data.y_train]
    decay = sum(t.square().sum() for t in theta.values())
    expected = (torch.sigmoid(w) * ce).mean() + 0.5 * decay
    assert float(problem.lower(w, theta)) == pytest.approx(float(expected), rel=1e-12)
    batch = torch.tensor([0, 3, 3, 7])
    expected_b = (torch.sigmoid(w[batch]) * ce[batch]).mean() + 0.5 * decay
    assert float(problem.lower(w, theta, batch)) == pytest.approx(float(expected_b), rel=1e-12)
