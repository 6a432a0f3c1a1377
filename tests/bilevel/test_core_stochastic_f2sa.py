r"""F2SA on the stochastic quadratic: the same x* as Implicit(CG), mini-batch convergence, an unbiased direction."""

from __future__ import annotations

import pytest
import torch
from _stochastic_quadratic import (
    assert_unbiased,
    implicit_cg_x_star,
    minibatch_single_loop,
    run_single_loop,
    stochastic_quadratic,
)

import bilevel as bl


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm())


def test_full_batch_f2sa_reaches_the_x_star_of_implicit_cg():
    """The penalty's bias is O(1/lambda): lambda grows from 10 by 0.5 per step (to 510 after 1000 steps)."""
    P = stochastic_quadratic()
    x_implicit = implicit_cg_x_star(P)
    assert _rel(x_implicit, P.x_star) < 1e-8
    f2sa = bl.F2SA(bl.LowerProblem(P.g), P.f, step_size=0.3, lam=10.0, lam_growth=lambda t: 0.5)
    x, state = run_single_loop(f2sa, torch.zeros(3), torch.zeros(6), 0.5, 1000)
    assert state.lam == pytest.approx(510.0)
    assert _rel(x, x_implicit) < 2e-3
    assert torch.allclose(state.z, P.y_star(x), atol=1e-4)  # z tracks argmin g


def test_minibatch_f2sa_reaches_x_star():
    err = minibatch_single_loop(stochastic_quadratic(), bl.F2SA, 0.1, 1500, step_size=0.1, lam=10.0,
                                lam_growth=lambda t: 0.05)
    assert err < 0.06


def test_f2sa_direction_is_unbiased_for_the_full_batch_penalty_gradient():
    P = stochastic_quadratic()
    gen = torch.Generator().manual_seed(3)
    x, y, z = torch.randn(3, generator=gen), torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    lam = 7.0
    f2sa = bl.F2SA(bl.LowerProblem(P.g), P.f, lam=lam, lower_batches=bl.RandomBatches(P.N, 8, seed=4),
                   upper_batches=bl.RandomBatches(P.N, 8, seed=5))
    samples = []
    for _ in range(400):
        samples.append(f2sa.step(x, bl.StochasticState(y=y, z=z, lam=lam)))
    exact = P.mu * (x - P.c) + lam * P.C @ (y - z)  # grad_x f + lam (grad_x g(x, y) - grad_x g(x, z))
    assert_unbiased(torch.stack(samples), exact)


def test_f2sa_rejects_a_nonpositive_penalty():
    P = stochastic_quadratic()
    with pytest.raises(ValueError, match="lam"):
        bl.F2SA(bl.LowerProblem(P.g), P.f, lam=0.0)
