r"""The logistic attack model shared by the linearized tests; the oracle's math is in
test_core_linearized.py's docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bilevel as bl

B, D_IN, EPS = 5, 6, 0.3


def logistic_data():
    theta = torch.randn(D_IN)
    xs = torch.rand(B, D_IN)
    ys = torch.where(torch.rand(B) > 0.5, 1.0, -1.0)
    z = (torch.rand(B, D_IN) * 2 - 1) * 0.1
    return theta, xs, ys, z


def attack_problem(xs, ys, solver=None):
    def l_atk(theta, delta):
        return -F.softplus(-ys * ((xs + delta) @ theta)).sum()

    constraint = bl.LInfBall(0.0, EPS) & bl.Box(-xs, 1 - xs)
    return bl.LowerProblem(l_atk, constraint=constraint, solver=solver)


def oracle(theta, xs, ys, z, step, inv_lam, sign=False):
    s = torch.sigmoid(-ys * ((xs + z) @ theta))  # (B,)
    grad = s[:, None] * ys[:, None] * theta  # grad_delta l_atk at z
    u = z - step * (grad.sign() if sign else grad)
    lo, hi = torch.maximum(torch.full_like(xs, -EPS), -xs), torch.minimum(torch.full_like(xs, EPS), 1 - xs)
    delta = torch.minimum(torch.maximum(u, lo), hi)
    free = (u > lo) & (u < hi)
    eye = torch.eye(D_IN)
    outer = theta[None, :, None] * (xs + z)[:, None, :]  # theta (x_i + z_i)'
    inner = s[:, None, None] * ys[:, None, None] * eye - (s * (1 - s))[:, None, None] * outer
    J = -inv_lam * free[:, :, None].to(theta.dtype) * inner
    return delta, J, free
