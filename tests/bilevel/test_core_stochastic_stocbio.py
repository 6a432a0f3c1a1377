r"""StocBiO: the mini-batch Neumann hypergradient is unbiased for the full-batch Q-term one, and reaches x*."""

from __future__ import annotations

import pytest
import torch
from _stochastic_quadratic import assert_unbiased, minibatch_solve_loop, stochastic_quadratic

import bilevel as bl


def test_stocbio_hypergradient_is_unbiased_for_the_full_batch_neumann_hypergradient():
    P = stochastic_quadratic()
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, generator=gen), torch.randn(6, generator=gen)
    y = P.y_star(x)
    Q, eta = 4, 0.3
    stocbio = bl.StocBiO(bl.RandomBatches(P.N, 8, seed=4), steps=Q, step_size=eta)
    lower = bl.LowerProblem(P.g, solver=bl.ClosedForm(lambda _: y))
    samples = []
    for _ in range(400):
        xx = x.clone().requires_grad_()
        (bl.solve(lower, xx, y, stocbio) * w).sum().backward()
        samples.append(xx.grad)
    # the same Q-term series on the full objective, by the deterministic Implicit(Neumann)
    full = bl.LowerProblem(lambda a, b: P.g(a, b), solver=bl.ClosedForm(lambda _: y))
    xx = x.clone().requires_grad_()
    (bl.solve(full, xx, y, bl.Implicit(bl.Neumann(steps=Q, alpha=eta))) * w).sum().backward()
    assert_unbiased(torch.stack(samples), xx.grad)
    # and that series is a biased (truncated) version of the exact hypergradient
    assert float((xx.grad + P.C @ torch.linalg.solve(P.A, w)).norm()) > 1e-3


def test_minibatch_stocbio_reaches_x_star():
    P = stochastic_quadratic()
    err, _ = minibatch_solve_loop(P, lambda batches: bl.StocBiO(batches, steps=10, step_size=0.3), 400)
    assert err < 0.1


def test_stochastic_strategies_reject_bad_options():
    with pytest.raises(ValueError, match="batches is required"):
        bl.StocBiO(None)
    with pytest.raises(ValueError, match="steps"):
        bl.AmIGO(lambda: None, steps=0)
    with pytest.raises(ValueError, match="step_size"):
        bl.StocBiO(lambda: None, step_size=-1.0)
    with pytest.raises(ValueError, match="no solver"):
        bl.solve(bl.LowerProblem(lambda x, y, b=None: (y**2).sum()), torch.zeros(1), torch.zeros(2), bl.AmIGO(lambda: None))


@pytest.mark.parametrize("make", [lambda b: bl.StocBiO(b, steps=3, step_size=0.3), lambda b: bl.AmIGO(b, steps=3)],
                         ids=["StocBiO", "AmIGO"])
def test_the_stochastic_strategies_refuse_vmap_by_name(make):
    """One batch stream and one state for every task: vmap (over x, or jacrev's batched backward pass) is refused
    with an error naming the method, instead of functorch's randomness error; a loop over tasks works."""
    P = stochastic_quadratic()
    strategy = make(bl.RandomBatches(P.N, 8, seed=4))
    lower = bl.LowerProblem(P.g, solver=bl.ClosedForm(P.y_star))
    F = lambda x: bl.solve(lower, x, torch.zeros(6, dtype=torch.float64), strategy).sum()  # noqa: E731
    xs = torch.randn(2, 3, dtype=torch.float64)
    name = type(strategy).__name__
    with pytest.raises(TypeError, match=f"{name} under vmap"):
        torch.func.vmap(torch.func.grad(F))(xs)
    with pytest.raises(TypeError, match=f"{name} under vmap"):
        torch.func.jacrev(lambda x: bl.solve(lower, x, torch.zeros(6, dtype=torch.float64), strategy))(xs[0])
    assert all(torch.isfinite(torch.func.grad(F)(x)).all() for x in xs)
