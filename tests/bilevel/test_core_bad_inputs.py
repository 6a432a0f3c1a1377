r"""Bad inputs to the core get one clear error naming the problem (each of these was silent or a bare PyTorch
error before): empty batches, an ended batch source, a foreign warm-start state, a bad step-size schedule, an
integer upper variable."""

from __future__ import annotations

import pytest
import torch
from _stochastic_quadratic import stochastic_quadratic

import bilevel as bl
from bilevel.stochastic import BatchError


def _empty():
    return torch.empty(0, dtype=torch.long)


def test_torch_optim_refuses_an_empty_batch():
    P = stochastic_quadratic()
    lower = bl.LowerProblem(P.g, solver=bl.TorchOptim(torch.optim.SGD, 5, batches=_empty, lr=0.1))
    with pytest.raises(BatchError, match="empty batch"):
        bl.solve(lower, torch.randn(3, requires_grad=True), torch.zeros(6), bl.FirstOrder())


@pytest.mark.parametrize("method", [bl.SOBA, bl.F2SA, bl.BOME])
def test_single_loop_methods_refuse_an_empty_batch(method):
    P = stochastic_quadratic()
    algo = method(bl.LowerProblem(P.g), P.f, lower_batches=_empty, upper_batches=bl.RandomBatches(P.N, 8))
    with pytest.raises(BatchError, match="empty batch"):
        algo.step(torch.randn(3), algo.init(torch.zeros(6)))


def test_amigo_refuses_an_empty_batch_and_an_empty_tuple():
    P = stochastic_quadratic()
    for bad in (_empty, lambda: ()):
        lower = bl.LowerProblem(P.g, solver=bl.ClosedForm(lambda x: P.y_star(x)))
        x = torch.randn(3, requires_grad=True)
        with pytest.raises(BatchError, match="empty"):
            bl.solve(lower, x, torch.zeros(6), bl.AmIGO(bad, steps=2, step_size=0.1)).sum().backward()


def test_a_stop_iteration_from_a_batch_callable_is_an_error_not_the_end_of_the_callers_loop():
    P = stochastic_quadratic()
    it = iter([bl.RandomBatches(P.N, 8)()])
    lower = bl.LowerProblem(P.g, solver=bl.TorchOptim(torch.optim.SGD, 3, batches=lambda: next(it), lr=0.1))
    solve = lambda x: bl.solve(lower, x, torch.zeros(6), bl.FirstOrder())
    with pytest.raises(BatchError, match="StopIteration"):
        list(map(solve, [torch.randn(3)]))  # before: map ended silently with an empty list


def test_a_sampler_keeps_its_state_dict_behind_the_check():
    sampler = bl.RandomBatches(10, 4, seed=3)
    algo = bl.SOBA(bl.LowerProblem(lambda x, y, b: (y ** 2).sum()), lambda x, y, b: (x * y).sum(), lower_batches=sampler)
    assert algo.lower_batches.state_dict()["generator"].shape == sampler.state_dict()["generator"].shape


def test_a_state_of_another_problem_is_refused():
    state = bl.StochasticState(y=torch.zeros(6), v=torch.zeros(6))
    with pytest.raises(ValueError, match="another problem"):
        state.load_state_dict(bl.StochasticState(y=torch.zeros(5), v=torch.zeros(5)).state_dict())
    with pytest.raises(ValueError, match="another problem"):
        state.load_state_dict(bl.StochasticState(y={"w": torch.zeros(6)}).state_dict())
    with pytest.raises(ValueError, match="missing keys \\['lam'\\]"):
        state.load_state_dict({"y": torch.zeros(6), "v": None, "z": None, "step": 3})
    good = bl.StochasticState(y=torch.ones(6), v=torch.ones(6), lam=2.0, step=4).state_dict()
    state.load_state_dict(good)
    assert state.step == 4 and torch.equal(state.y, torch.ones(6))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), 0.0, float("inf"), "0.1"])
def test_a_bad_step_size_schedule_value_is_refused(bad):
    P = stochastic_quadratic()
    soba = bl.SOBA(bl.LowerProblem(P.g), P.f, step_size=lambda t: bad, lower_batches=bl.RandomBatches(P.N, 8),
                   upper_batches=bl.RandomBatches(P.N, 8, seed=1))
    with pytest.raises((ValueError, TypeError), match="schedule returned"):
        soba.step(torch.randn(3), soba.init(torch.zeros(6)))


def test_an_integer_upper_variable_is_refused_at_solve():
    lower = bl.LowerProblem(lambda x, y: ((y - x) ** 2).sum(), solver=bl.GradientDescent(0.3, 10))
    with pytest.raises(TypeError, match="x must be floating point"):
        bl.solve(lower, torch.arange(3), torch.zeros(3), bl.Implicit())


def test_an_upper_variable_without_grad_gives_a_value_without_a_graph():
    """Documented behaviour (bl.solve's x): a value, as under torch.no_grad()."""
    lower = bl.LowerProblem(lambda x, y: ((y - x) ** 2).sum(), solver=bl.GradientDescent(0.3, 50))
    y = bl.solve(lower, torch.ones(3), torch.zeros(3), bl.Implicit())
    assert not y.requires_grad
    torch.testing.assert_close(y, torch.ones(3), rtol=1e-10, atol=1e-10)
