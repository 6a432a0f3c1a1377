"""benchmarks/hand_loops.py: the hand-written loops the per-iteration cost is measured against are the same
algorithms as bilevel's steps: on a float64 problem, with the same seeds (so the same mini-batches) and steps,
their iterates agree with bilevel's SOBA, F2SA and BOME driven by torch.optim SGD, and the analytic SOBA
(derivatives as matrix products) agrees with the autograd one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hand_loops import HAND, analytic_soba, hand_soba  # noqa: E402
from benchmarks.quadratic_problem import make_problem  # noqa: E402
from benchmarks.stochastic_quadratic import METHODS  # noqa: E402

ITERATIONS = 30


@pytest.fixture(scope="module")
def problem():
    return make_problem(n_inner=256, n_outer=64, p=12, d=4, seed=2, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_loop_iterates_equal_bilevels(problem, name):
    x, ours = METHODS[name](problem, 16, 7)
    it, hand = HAND[name](problem, 16, 7)
    for _ in range(ITERATIONS):
        ours()
        hand()
    moved = (it["x"] - torch.full_like(it["x"], -2.0)).abs().max()
    assert moved > 1e-3  # the iterates went somewhere
    torch.testing.assert_close(x.detach(), it["x"].detach(), rtol=1e-10, atol=1e-12)


def test_analytic_soba_equals_autograd_soba(problem):
    it, hand = hand_soba(problem, 16, 7)
    an, analytic = analytic_soba(problem, 16, 7)
    for _ in range(ITERATIONS):
        hand()
        analytic()
    for key in ("x", "z", "v"):
        torch.testing.assert_close(an[key], it[key].detach(), rtol=1e-10, atol=1e-12)
