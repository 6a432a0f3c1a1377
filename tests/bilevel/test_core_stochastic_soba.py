r"""SOBA on the stochastic quadratic: convergence to x*, unbiased directions, the masked v-step for boxes."""

from __future__ import annotations

import torch
from _stochastic_quadratic import assert_unbiased, box_solution, minibatch_single_loop, run_single_loop, stochastic_quadratic

import bilevel as bl


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm())


def test_full_batch_soba_converges_to_x_star_and_v_to_the_system_solution():
    P = stochastic_quadratic()
    soba = bl.SOBA(bl.LowerProblem(P.g), P.f, step_size=0.3)
    x, state = run_single_loop(soba, torch.zeros(3), torch.zeros(6), 0.5, 600)
    assert _rel(x, P.x_star) < 1e-3
    y = P.y_star(x)
    assert torch.allclose(state.y, y, atol=1e-3)
    v_exact = -torch.linalg.solve(P.A, P.F @ y - P.sbar)  # -A^{-1} grad_y f
    assert torch.allclose(state.v, v_exact, atol=1e-3)


def test_minibatch_soba_reaches_x_star():
    """Batches of 32 out of 256, constant steps: a noise floor; 1500 iterations reach 6% of ||x*||."""
    assert minibatch_single_loop(stochastic_quadratic(), bl.SOBA, 0.1, 1500, step_size=0.1) < 0.06


def test_soba_directions_are_unbiased():
    """At fixed (x, y, v): E[D_x] = grad^2_xy g v + grad_x f and E[v+] = v - rho (grad^2_yy g v + grad_y f) (full batch)."""
    P = stochastic_quadratic()
    gen = torch.Generator().manual_seed(3)
    x, y, v = torch.randn(3, generator=gen), torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    rho = 0.1
    soba = bl.SOBA(bl.LowerProblem(P.g), P.f, step_size=rho, lower_batches=bl.RandomBatches(P.N, 8, seed=4),
                   upper_batches=bl.RandomBatches(P.N, 8, seed=5))
    dxs, vs = [], []
    for _ in range(400):
        state = bl.StochasticState(y=y, v=v)
        dxs.append(soba.step(x, state))
        vs.append(state.v)
    sigma_x = P.C  # d/dx of grad_y g(x, y) is C' in expectation (the sigma term has mean zero)
    dx_exact = sigma_x @ v + P.mu * (x - P.c)
    v_exact = v - rho * (P.A @ v + P.F @ y - P.sbar)
    assert_unbiased(torch.stack(dxs), dx_exact)
    assert_unbiased(torch.stack(vs), v_exact)


def test_box_constrained_soba_reaches_the_active_set_solution():
    P = stochastic_quadratic()
    y_free = P.y_star(P.x_star)
    k = int(torch.argmax(y_free))
    upper = torch.full((6,), 50.0)
    upper[k] = float(y_free[k]) - 0.3
    active = torch.zeros(6, dtype=torch.bool)
    active[k] = True
    ref = box_solution(P, upper, active)
    assert bool((ref.multipliers > 1e-3).all()) and bool((ref.y_star[~active] < upper[~active] - 1e-3).all())  # KKT
    lower = bl.LowerProblem(P.g, constraint=bl.Box(-50.0, upper))
    soba = bl.SOBA(lower, P.f, step_size=0.3)
    x, state = run_single_loop(soba, torch.zeros(3), torch.zeros(6), 0.5, 800)
    assert _rel(x, ref.x_star) < 1e-3
    assert float(state.y[k]) == float(upper[k]) and abs(float(state.v[k])) < 1e-12  # v vanishes on the active set
