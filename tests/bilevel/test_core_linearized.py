r"""Linearized lower level and Danskin's theorem on a logistic model (docs: concepts/strategies, "Linearized").

Attack objective (the lower problem minimizes it): l_atk(theta, delta) = -sum_i log(1 + exp(-m_i)),
m_i = y_i theta'(x_i + delta_i), so grad_delta_i l_atk = sigma(-m_i) y_i theta and

    delta*_i = clip(z_i - step * sigma(-m_i) y_i theta, C_i)          (m_i taken at z)
    d delta*_i / d theta = -(1/lam) D_i [ s_i y_i I - s_i (1 - s_i) theta (x_i + z_i)' ],   s_i = sigma(-m_i),

with D_i the 0/1 mask of coordinates strictly inside C_i = [-eps, eps] ∩ [-x_i, 1 - x_i].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _logistic import D_IN, EPS, B, attack_problem, logistic_data, oracle  # noqa: E402

import bilevel as bl


@pytest.mark.parametrize("step,lam", [(0.5, None), (0.5, 10.0), (2.0, 2.0), (0.25, 0.8)],
                         ids=["lam=1/step", "decoupled-lam10", "lam=step", "decoupled-lam0.8"])
def test_linearized_logistic_value_and_jacobian(step, lam):
    theta, xs, ys, z = logistic_data()
    lower = attack_problem(xs, ys)
    strategy = bl.Linearized(step=step, lam=lam)
    inv_lam = step if lam is None else 1.0 / lam
    delta_o, J_o, free = oracle(theta, xs, ys, z, step, inv_lam)
    assert free.any() and (~free).any(), "the instance must have free and clipped coordinates"
    delta = bl.solve(lower, theta, z, strategy)
    assert torch.allclose(delta, delta_o, rtol=0, atol=1e-14)
    J = torch.autograd.functional.jacobian(lambda th: bl.solve(lower, th, z, strategy), theta)
    assert J.shape == (B, D_IN, D_IN)
    assert torch.allclose(J, J_o, rtol=1e-12, atol=1e-14)
    # total hypergradient of the training loss lands in theta.grad: grad_theta f + J' grad_delta f
    th = theta.clone().requires_grad_()
    d = bl.solve(lower, th, z, strategy)
    F.softplus(-ys * ((xs + d) @ th)).sum().backward()
    th2, d2 = theta.clone().requires_grad_(), delta_o.clone().requires_grad_()
    f = F.softplus(-ys * ((xs + d2) @ th2)).sum()
    gth, gd = torch.autograd.grad(f, (th2, d2))
    assert torch.allclose(th.grad, gth + torch.einsum("bij,bi->j", J_o, gd), rtol=1e-12, atol=1e-13)


def test_linearized_no_implicit_term_and_sign():
    theta, xs, ys, z = logistic_data()
    lower = attack_problem(xs, ys)
    for strategy, step, sign in [(bl.Linearized(step=0.5, lam=math.inf), 0.5, False),
                                 (bl.Linearized(step=0.4, sign=True), 0.4, True)]:
        delta_o, _, free = oracle(theta, xs, ys, z, step, 0.0, sign=sign)
        th = theta.clone().requires_grad_()
        delta = bl.solve(lower, th, z, strategy)
        assert torch.allclose(delta, delta_o, rtol=0, atol=1e-14)
        assert not delta.requires_grad  # no implicit term: delta is a constant for autograd
        assert strategy.ig_scale == 0.0
    # the FGSM value is z - step*sign(grad), clipped: check one free coordinate's magnitude explicitly
    delta = bl.solve(lower, theta, torch.zeros(B, D_IN), bl.Linearized(step=0.05, sign=True))
    assert torch.allclose(delta.abs()[(xs > 0.05) & (xs < 0.95)], torch.full((), 0.05))


def test_linearized_ig_scale():
    assert bl.Linearized(step=0.5).ig_scale == 0.5
    assert bl.Linearized(step=0.5, lam=10.0).ig_scale == pytest.approx(0.1)
    assert bl.Linearized(step=2.0, lam=2.0).ig_scale == pytest.approx(0.5)


def test_linearized_equals_autograd_through_one_projected_step_when_lam_is_none():
    """lam = 1/step: the derivative is plain autograd through Proj(z - step grad g(x, z)) (z detached)."""
    theta, xs, ys, z = logistic_data()
    step = 0.5
    lower = attack_problem(xs, ys, solver=bl.ProjectedGradient(step, 1))
    J_lin = torch.autograd.functional.jacobian(lambda th: bl.solve(lower, th, z, bl.Linearized(step)), theta)
    J_unr = torch.autograd.functional.jacobian(lambda th: bl.solve(lower, th, z, bl.Unrolled()), theta)
    assert torch.allclose(J_lin, J_unr, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", ["signed", "closed_form"])
def test_danskin_robust_logistic(solver):
    r"""max_{||delta||_inf <= eps} log(1 + exp(-y theta'(x + delta))) = log(1 + exp(-y theta'x + eps ||theta||_1)),
    attained at delta = -eps y sign(theta); by Danskin its gradient is sigma(-m)(-y x + eps sign theta)."""
    theta, xs, ys, _ = logistic_data()
    eps = 0.2

    def l_atk(th, delta):
        return -F.softplus(-ys * ((xs + delta) @ th)).sum()

    if solver == "signed":  # one signed step of size eps from 0 is the exact maximizer
        s = bl.SignedProjectedGradient(step_size=eps, steps=1)
    else:
        s = bl.ClosedForm(lambda th: -eps * ys[:, None] * th.sign().expand(B, D_IN))
    lower = bl.LowerProblem(l_atk, constraint=bl.LInfBall(0.0, eps), solver=s)
    th = theta.clone().requires_grad_()
    delta = bl.solve(lower, th, torch.zeros(B, D_IN), bl.FirstOrder())
    assert torch.allclose(delta, -eps * ys[:, None] * theta.sign(), rtol=0, atol=1e-15)
    loss = F.softplus(-ys * ((xs + delta) @ th)).sum()
    loss.backward()
    robust = F.softplus(-ys * (xs @ theta) + eps * theta.abs().sum())
    assert torch.allclose(loss.detach(), robust.sum(), rtol=1e-13)
    m = ys * (xs @ theta) - eps * theta.abs().sum()
    danskin = (torch.sigmoid(-m)[:, None] * (-ys[:, None] * xs + eps * theta.sign())).sum(0)
    assert torch.allclose(th.grad, danskin, rtol=1e-12, atol=1e-14)
    th_cf = theta.clone().requires_grad_()
    F.softplus(-ys * (xs @ th_cf) + eps * th_cf.abs().sum()).sum().backward()
    assert torch.allclose(th.grad, th_cf.grad, rtol=1e-12, atol=1e-14)


def test_linearized_mask_tol_drops_coordinates_near_the_bounds():
    theta, xs, ys, z = logistic_data()
    lower = attack_problem(xs, ys)
    step, tol = 0.5, 0.05
    delta_o, J_o, free = oracle(theta, xs, ys, z, step, step)
    lo, hi = torch.maximum(torch.full_like(xs, -EPS), -xs), torch.minimum(torch.full_like(xs, EPS), 1 - xs)
    strict = (delta_o > lo + tol) & (delta_o < hi - tol)
    assert (free & ~strict).any(), "the instance must have free coordinates within tol of a bound"
    strategy = bl.Linearized(step=step, mask_tol=tol)
    delta = bl.solve(lower, theta, z, strategy)
    assert torch.equal(delta, bl.solve(lower, theta, z, bl.Linearized(step=step)))
    J = torch.autograd.functional.jacobian(lambda th: bl.solve(lower, th, z, strategy), theta)
    assert torch.allclose(J, J_o * strict[:, :, None].to(J_o.dtype), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="mask_tol"):
        bl.Linearized(step=step, mask_tol=-1.0)
