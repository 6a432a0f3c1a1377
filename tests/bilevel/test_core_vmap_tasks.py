r"""``vmap`` over tasks as meta-learning writes it: the upper variable shared (``in_dims=None``), the task data
batched and captured by ``g``; every deterministic strategy against a Python loop over the tasks (float64)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

STRATEGIES = {
    "implicit-cg": lambda: bl.Implicit(bl.CG(maxiter=30)),
    "implicit-neumann": lambda: bl.Implicit(bl.Neumann(steps=60, alpha=0.3)),
    "implicit-dense": lambda: bl.Implicit(bl.DenseSolve()),
    "unrolled": lambda: bl.Unrolled(),
    "unrolled-truncated": lambda: bl.Unrolled(truncate=3),
    "linearized": lambda: bl.Linearized(step=0.2),
    "linearized-central": lambda: bl.Linearized(step=0.2, products=bl.CentralDifference()),
    "first-order": lambda: bl.FirstOrder(),
    "first-order-init": lambda: bl.FirstOrder(through_init=True),
}
TASKS, N, D = 5, 12, 4


def _tasks():
    X = torch.randn(TASKS, N, D)
    Y = torch.sin(X @ torch.randn(D)) + 0.1 * torch.randn(TASKS, N)
    return X, Y


def _task_loss(theta, X, Y, strategy):
    """iMAML's shape: g = support loss + proximal term to theta; f = query loss of the adapted weights."""
    def g(th, w):
        return 0.5 * ((torch.tanh(X[:8] @ w) - Y[:8]) ** 2).mean() + 0.5 * ((w - th) ** 2).sum()

    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 60))
    w = bl.solve(lower, theta, theta, strategy)
    return 0.5 * ((torch.tanh(X[8:] @ w) - Y[8:]) ** 2).mean()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_vmap_of_grad_with_a_shared_upper_variable_equals_the_loop(name):
    X, Y = _tasks()
    theta = 0.3 * torch.randn(D)
    strategy = STRATEGIES[name]()
    batched = torch.func.vmap(torch.func.grad(_task_loss), in_dims=(None, 0, 0, None))(theta, X, Y, strategy)
    loop = torch.stack([torch.func.grad(_task_loss)(theta, X[i], Y[i], strategy) for i in range(TASKS)])
    autograd = []
    for i in range(TASKS):
        th = theta.clone().requires_grad_()
        _task_loss(th, X[i], Y[i], strategy).backward()
        autograd.append(th.grad)
    assert batched.shape == (TASKS, D) and loop.abs().max() > 1e-4 or name == "first-order"
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched, torch.stack(autograd), rtol=1e-10, atol=1e-12)
    if name == "first-order":  # f depends on theta only through w: an exact zero
        assert torch.equal(batched, torch.zeros_like(batched))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_vmap_with_a_batched_upper_variable_equals_the_loop(name):
    X, Y = _tasks()
    thetas = 0.3 * torch.randn(TASKS, D)
    strategy = STRATEGIES[name]()
    batched = torch.func.vmap(torch.func.grad(_task_loss), in_dims=(0, 0, 0, None))(thetas, X, Y, strategy)
    loop = torch.stack([torch.func.grad(_task_loss)(thetas[i], X[i], Y[i], strategy) for i in range(TASKS)])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_plain_vmap_of_solve_with_a_shared_upper_variable(name):
    X, Y = _tasks()
    theta = 0.3 * torch.randn(D)
    strategy = STRATEGIES[name]()

    def adapted(th, Xt, Yt):
        g = lambda th, w: 0.5 * ((torch.tanh(Xt @ w) - Yt) ** 2).mean() + 0.5 * ((w - th) ** 2).sum()
        return bl.solve(bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 60)), th, th, strategy)

    ws = torch.func.vmap(adapted, in_dims=(None, 0, 0))(theta, X, Y)
    loop = torch.stack([adapted(theta, X[i], Y[i]) for i in range(TASKS)])
    torch.testing.assert_close(ws, loop, rtol=1e-12, atol=1e-14)


def test_last_info_and_residual_hold_one_value_per_task():
    X, Y = _tasks()
    theta = 0.3 * torch.randn(D)
    strategy = bl.Implicit(bl.CG(maxiter=3), residual=bl.ResidualCheck(step=0.3))
    with pytest.warns(bl.HypergradientWarning):  # three CG iterations do not solve the 4x4 systems
        torch.func.vmap(torch.func.grad(_task_loss), in_dims=(None, 0, 0, None))(theta, X, Y, strategy)
    rel, residual = strategy.last_info.relative_residual, strategy.last_residual
    assert rel.shape == (TASKS,) and residual.shape == (TASKS,) and strategy.last_info.min_curvature.shape == (TASKS,)
    for i in range(TASKS):  # each task's own numbers, as a loop computes them
        one = bl.Implicit(bl.CG(maxiter=3), residual=bl.ResidualCheck(step=0.3), check=None)
        torch.func.grad(_task_loss)(theta, X[i], Y[i], one)
        torch.testing.assert_close(rel[i], one.last_info.relative_residual, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(residual[i], one.last_residual, rtol=1e-10, atol=1e-14)
        assert one.last_residual.ndim == 0


def test_nested_vmap_gives_one_value_per_task_and_level():
    X, Y = _tasks()
    thetas = 0.3 * torch.randn(2, D)
    strategy = bl.Implicit(bl.CG(maxiter=30), residual=bl.ResidualCheck(step=0.3))
    per_task = torch.func.vmap(torch.func.grad(_task_loss), in_dims=(None, 0, 0, None))
    out = torch.func.vmap(per_task, in_dims=(0, None, None, None))(thetas, X, Y, strategy)
    assert out.shape == (2, TASKS, D) and strategy.last_residual.shape == (2, TASKS)
    torch.testing.assert_close(out[1, 2], torch.func.grad(_task_loss)(thetas[1], X[2], Y[2], bl.Implicit(bl.CG(maxiter=30))),
                               rtol=1e-10, atol=1e-12)
