"""Shared setup of the core `bilevel` oracle tests: float64 by default, a fixed seed per test.

Test modules here are named ``test_core_*.py`` so that their basenames cannot collide with the
application test folders (pytest's default import mode needs unique basenames without ``__init__.py``).

Equality conventions: two different computations of the same quantity (autograd against a closed form,
a vmapped solve against a loop, a difference quotient against a double backward) are compared with a
stated tolerance (relative error, or a few ulps of the dtype), never ``torch.equal``: kernels differ
between processors (AVX2 / AVX-512) in their last bits. Bit equality is asserted only for the same
computation replayed: a resume, a repeated run, a cached value against its recomputation, or exact
arithmetic on small integers and powers of two.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def mlp_problem() -> SimpleNamespace:
    r"""A small nonlinear, strongly convex-at-the-solution lower problem.

    Lower variable ``w`` = ``{"W1": (4, 3), "b1": (4,), "W2": (4,)}`` of a softplus MLP (activations
    shifted by log 2 so that they are centred at 0); upper variable ``x`` (3,) holds log-weights of a
    per-layer L2 penalty towards a fixed random anchor ``a`` (the anchor breaks the symmetry between
    hidden units):

    .. math:: g(x, w) = \tfrac{1}{2N}\|\mathrm{mlp}_w(U) - t\|^2 + \tfrac12 \sum_k e^{x_k} \|w_k - a_k\|^2,
    .. math:: f(x, w) = \tfrac{1}{2N_v}\|\mathrm{mlp}_w(U_v) - t_v\|^2 + 0.1 \sum_k \sin x_k.

    At ``x0`` the Hessian in ``w`` has spectrum in [0.57, 2.9]; gradient descent with step 0.5 reaches
    machine precision in about 120 steps.
    """
    gen = torch.Generator().manual_seed(1234)
    U, t = torch.randn(8, 3, generator=gen), torch.randn(8, generator=gen)
    Uv, tv = torch.randn(6, 3, generator=gen), torch.randn(6, generator=gen)
    names = ("W1", "b1", "W2")
    anchor = {"W1": 0.6 * torch.randn(4, 3, generator=gen), "b1": 0.6 * torch.randn(4, generator=gen),
              "W2": 0.6 * torch.randn(4, generator=gen)}

    def mlp(w, inp):
        return (F.softplus(inp @ w["W1"].T + w["b1"]) - math.log(2.0)) @ w["W2"]

    def g(x, w):
        fit = 0.5 * ((mlp(w, U) - t) ** 2).mean()
        return fit + 0.5 * sum(torch.exp(x[k]) * ((w[n] - anchor[n]) ** 2).sum() for k, n in enumerate(names))

    def f(x, w):
        return 0.5 * ((mlp(w, Uv) - tv) ** 2).mean() + 0.1 * torch.sin(x).sum()

    x0 = torch.tensor([-0.3, 0.2, -0.1])
    init = {"W1": 0.5 * torch.randn(4, 3, generator=gen), "b1": 0.5 * torch.randn(4, generator=gen),
            "W2": 0.5 * torch.randn(4, generator=gen)}
    step = 0.5

    def lower(steps: int, constraint=None) -> bl.LowerProblem:
        solver = bl.GradientDescent(step, steps) if constraint is None else bl.ProjectedGradient(step, steps)
        return bl.LowerProblem(g, constraint=constraint, solver=solver)

    return SimpleNamespace(g=g, f=f, mlp=mlp, x0=x0, init=init, step=step, lower=lower, names=names)
