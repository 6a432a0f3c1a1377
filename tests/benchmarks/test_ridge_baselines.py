"""benchmarks/ridge_baselines.py: each baseline hypergradient converges to the float64 closed form of per-feature
ridge, and the hand-written CG at one iteration count is a different (worse) computation than at convergence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.hypergrad_ridge import make_ridge, rel_error  # noqa: E402
from benchmarks.ridge_baselines import betty_hypergrad, handwritten_cg, torchopt_hypergrad  # noqa: E402


@pytest.fixture(scope="module")
def ridge():
    return make_ridge(d=20, n=200, n_val=50, t_max=0.5)  # well conditioned: CG converges in d iterations


def test_handwritten_cg_reaches_the_closed_form(ridge):
    assert rel_error(handwritten_cg(ridge, iters=40)(), ridge.grad_true) < 1e-8
    assert rel_error(handwritten_cg(ridge, iters=2)(), ridge.grad_true) > 1e-4  # the iteration count matters


def test_betty_neumann_reaches_the_closed_form_and_its_cg_does_not(ridge):
    """Betty 0.2.1's Neumann series converges (step 1/L, contraction 1 - mu/L); its CG does not, whatever the
    iteration count (its direction update uses the old residual: tests/integrations/test_betty.py)."""
    pytest.importorskip("betty")
    got = betty_hypergrad(ridge, type="neumann", neumann_iterations=400, neumann_alpha=1.0 / ridge.L)()
    assert rel_error(got, ridge.grad_true) < 1e-6
    assert rel_error(betty_hypergrad(ridge, type="cg", cg_iterations=40, cg_alpha=1.0)(), ridge.grad_true) > 1e-3


@pytest.mark.parametrize("normal", [False, True])
def test_torchopt_custom_root_reaches_the_closed_form(ridge, normal):
    pytest.importorskip("torchopt")
    assert rel_error(torchopt_hypergrad(ridge, iters=80, normal=normal)(), ridge.grad_true) < 1e-6
