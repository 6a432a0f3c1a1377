"""benchmarks/outer_loops.py: with an exact lower solver and an exact implicit hypergradient, the solve
iteration is gradient descent on h(x) = f(z*(x), x) (the closed form of quadratic_problem.metrics), warm-started
from the previous lower solution; the single-loop iteration applies torch.optim's step to method.step's output."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bilevel as bl  # noqa: E402
from benchmarks.outer_loops import single_loop_iteration, solve_iteration  # noqa: E402
from benchmarks.quadratic_problem import make_problem, x0, z0, z_star  # noqa: E402


def _grad_h(P, x):
    e, z = P.exact, z_star(P, x)
    return e.H @ x + e.K @ z + e.h + P.J.T @ (e.F @ z + e.K.T @ x + e.f)


def test_solve_iteration_is_gradient_descent_on_h():
    P = make_problem(n_inner=256, n_outer=64, p=12, d=4, seed=1, dtype=torch.float64)
    lower = bl.LowerProblem(P.g_full, solver=bl.GradientDescent(1.0, 400))  # contraction 0.9 per step
    calls = []

    def f(x, y, batch):
        calls.append(batch)
        return P.f_full(x, y)

    x = x0(P)
    lr = 0.5
    step = solve_iteration(lower, bl.Implicit(bl.CG(maxiter=50)), f, lambda: "batch", x, torch.optim.SGD([x], lr=lr),
                           z0(P))
    expected = x.detach().clone()
    for _ in range(3):
        step()
        expected = expected - lr * _grad_h(P, expected)
        torch.testing.assert_close(x.detach(), expected, rtol=1e-8, atol=1e-10)
        assert x.grad is None  # zeroed after the step
    assert calls == ["batch"] * 3  # one upper batch per iteration


def test_single_loop_iteration_steps_x_with_the_methods_estimate():
    class Constant:  # a stand-in method whose estimate of grad h is known
        def step(self, x, state):
            state["calls"] += 1
            return torch.ones_like(x)

    x = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    state = {"calls": 0}
    step = single_loop_iteration(Constant(), x, opt, state, sched)
    step()
    step()
    torch.testing.assert_close(x.detach(), torch.full((3,), -0.1 - 0.05))  # lr 0.1, then 0.1 / 2
    assert state["calls"] == 2
