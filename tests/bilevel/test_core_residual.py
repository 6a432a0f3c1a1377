r"""The lower residual ||y - Proj_C(y - eta grad_y g)|| / eta: hand computations and the opt-in check."""

from __future__ import annotations

import warnings

import pytest
import torch
from _quadratic import quadratic

import bilevel as bl


def test_residual_equals_the_hand_computation_with_a_box():
    q = quadratic(n=5, m=3)
    box = bl.Box(-0.2, 0.3)
    lower = bl.LowerProblem(q.g, constraint=box)
    x, y, eta = torch.randn(3), torch.tensor([0.3, -0.2, 0.1, 0.0, 0.25]), 0.7
    grad = q.H @ y + q.C.T @ x + q.a0
    hand = torch.linalg.vector_norm(y - (y - eta * grad).clamp(-0.2, 0.3)) / eta
    r = bl.lower_residual(lower, x, y, eta)
    assert r.ndim == 0 and torch.allclose(r, hand, rtol=1e-14)
    # unconstrained: the gradient norm, whatever the step
    free = bl.LowerProblem(q.g)
    assert torch.allclose(bl.lower_residual(free, x, y, 0.1), grad.norm(), rtol=1e-13)


def test_residual_on_a_batch_uses_g_of_that_batch():
    D = torch.randn(10, 4)

    def g(x, y, batch=None):
        rows = D if batch is None else D[batch]
        return 0.5 * ((rows @ y - x) ** 2).mean()

    lower, x, y = bl.LowerProblem(g), torch.tensor(0.5), torch.randn(4)
    batch = torch.tensor([1, 3, 3, 7])
    rows = D[batch]
    hand = (rows.T @ (rows @ y - x) / 4).norm()
    assert torch.allclose(bl.lower_residual(lower, x, y, 1.0, batch=batch), hand, rtol=1e-13)


def test_check_fires_on_an_unconverged_solve_and_passes_a_converged_one():
    q = quadratic(n=4, m=3)
    x, init = torch.randn(3), torch.zeros(4)
    check = bl.ResidualCheck(step=0.3, tol=1e-6)
    short = bl.LowerProblem(q.g, solver=bl.GradientDescent(0.3, 3))
    y_short = bl.solve(short, x, init, bl.FirstOrder())
    expected = float(bl.lower_residual(short, x, y_short, 0.3))
    assert expected > 1e-2
    with pytest.raises(bl.LowerSolveError, match=f"{expected:.3g}"):
        check(short, x, y_short)
    with pytest.warns(RuntimeWarning, match="not converged"):
        r = bl.ResidualCheck(step=0.3, tol=1e-6, warn=True)(short, x, y_short)
    assert float(r) == pytest.approx(expected, rel=1e-12)
    long = bl.LowerProblem(q.g, solver=bl.GradientDescent(0.3, 200))
    y_long = bl.solve(long, x, init, bl.FirstOrder())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(check(long, x, y_long)) < 1e-6
    assert torch.allclose(y_long, q.y_star(x), atol=1e-8)


def test_residual_check_rejects_bad_options():
    with pytest.raises(ValueError, match="step"):
        bl.ResidualCheck(step=0.0)
    with pytest.raises(ValueError, match="tol"):
        bl.ResidualCheck(tol=-1.0)
    with pytest.raises(ValueError, match="step"):
        bl.lower_residual(bl.LowerProblem(lambda x, y: (y**2).sum()), torch.zeros(1), torch.zeros(2), -1.0)
