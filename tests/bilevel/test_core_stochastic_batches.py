r"""Batch sources and the checkpointable state: cycling, reproducibility, round trips, clear errors."""

from __future__ import annotations

import io

import pytest
import torch
from _stochastic_quadratic import run_single_loop, stochastic_quadratic
from torch.utils.data import DataLoader, TensorDataset

import bilevel as bl
from bilevel.stochastic import IterableBatches, as_batches


def test_iterable_batches_cycle_over_passes_of_a_dataloader():
    data = torch.arange(10.0)
    draw = as_batches(DataLoader(TensorDataset(data), batch_size=4))
    firsts = [float(draw()[0][0]) for _ in range(7)]
    assert firsts == [0.0, 4.0, 8.0, 0.0, 4.0, 8.0, 0.0]  # three batches per pass, then a new pass
    with pytest.raises(ValueError, match="empty"):
        IterableBatches([])()


def test_random_batches_are_uniform_and_their_state_round_trips():
    sampler = bl.RandomBatches(5, 4000, seed=7)
    counts = torch.bincount(sampler(), minlength=5).double()
    # multinomial counts: mean 800, sd sqrt(4000 * 0.2 * 0.8) ~ 25.3
    assert bool(((counts - 800).abs() < 5 * 25.3).all())
    state = sampler.state_dict()
    a = sampler()
    sampler.load_state_dict(state)
    assert torch.equal(sampler(), a)
    with pytest.raises(ValueError, match="positive integers"):
        bl.RandomBatches(0, 3)
    with pytest.raises(TypeError, match="batch source"):
        as_batches(torch.zeros(3))


def test_a_checkpointed_soba_run_resumes_bit_exactly():
    """Save (state, samplers) after 30 steps, run 30 more; reload and rerun the 30: identical iterates."""
    P = stochastic_quadratic()

    def make():
        return bl.SOBA(bl.LowerProblem(P.g), P.f, step_size=0.1, lower_batches=bl.RandomBatches(P.N, 16, seed=1),
                       upper_batches=bl.RandomBatches(P.N, 16, seed=2))

    soba = make()
    x, state = run_single_loop(soba, torch.zeros(3), torch.zeros(6), 0.1, 30)
    buf = io.BytesIO()
    torch.save({"x": x, "state": state.state_dict(), "lower": soba.lower_batches.state_dict(),
                "upper": soba.upper_batches.state_dict()}, buf)
    for _ in range(30):
        x = x - 0.1 * soba.step(x, state)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make()
    resumed.lower_batches.load_state_dict(ckpt["lower"])
    resumed.upper_batches.load_state_dict(ckpt["upper"])
    state2 = resumed.init(torch.zeros(6))
    state2.load_state_dict(ckpt["state"])
    x2 = ckpt["x"]
    for _ in range(30):
        x2 = x2 - 0.1 * resumed.step(x2, state2)
    assert state2.step == state.step == 60
    assert torch.equal(x2, x) and torch.equal(state2.y, state.y) and torch.equal(state2.v, state.v)
