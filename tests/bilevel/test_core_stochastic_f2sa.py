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


def test_benchopt_configuration_options_follow_the_reference_update():
    """Separate y and z steps, the unscaled y-step and a lambda schedule, against the update written out by hand."""
    P = stochastic_quadratic()
    sched = lambda t: 2.0 + 0.5 * t  # noqa: E731
    algo = bl.F2SA(bl.LowerProblem(P.g), P.f, step_size=0.3, y_step_size=lambda t: 0.05 / (t + 1), z_step_size=0.2,
                   scale_y_step=False, lam_schedule=sched)
    x, state = torch.randn(P.m), algo.init(torch.zeros(P.n))
    y, z = state.y.clone(), state.z.clone()
    grad = lambda fn, a, b, i: torch.func.grad(fn, argnums=i)(a, b)  # noqa: E731
    for t in range(4):
        lam = sched(t)
        assert state.lam == lam
        d = algo.step(x, state)
        z_ref = z - 0.2 * grad(P.g, x, z, 1)
        y_ref = y - (0.05 / (t + 1)) * (grad(P.f, x, y, 1) + lam * grad(P.g, x, y, 1))
        d_ref = grad(P.f, x, y, 0) + lam * (grad(P.g, x, y, 0) - grad(P.g, x, z, 0))
        torch.testing.assert_close(state.z, z_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.y, y_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-14)
        y, z = y_ref, z_ref
    with pytest.raises(ValueError, match="lam_schedule returned"):
        bl.F2SA(bl.LowerProblem(P.g), P.f, lam_schedule=lambda t: -1.0).init(torch.zeros(P.n))
