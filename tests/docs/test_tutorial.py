"""The documentation's code runs: every ```python block of a page, in order, in one namespace per page.

Each test then asserts the numbers the page's prose relies on (closed forms, finite differences, a
falling validation loss), so a page whose claims drift from the library fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch

DOCS = Path(__file__).resolve().parents[2] / "docs"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(page: str) -> List[str]:
    """The ```python fenced blocks of a page (top-level fences only), in order."""
    return _FENCE.findall((DOCS / page).read_text(encoding="utf-8"))


@pytest.fixture
def single_thread() -> Iterator[None]:
    # The pages' problems are tiny: one thread is faster than two on a loaded 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_page(page: str) -> Dict[str, Any]:
    blocks = python_blocks(page)
    assert blocks, f"{page} has no ```python block"
    ns: Dict[str, Any] = {"__name__": f"docs_{Path(page).stem}"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{page} [python block {i + 1}]", "exec")
        exec(code, ns)
    return ns


def test_fence_parser_finds_blocks_in_order() -> None:
    text = "intro\n```python\na = 1\n```\n```text\nnot code\n```\n```python\nb = a + 1\n```\n"
    assert _FENCE.findall(text) == ["a = 1\n", "b = a + 1\n"]


def test_index_example_matches_closed_form(single_thread: None, capsys: pytest.CaptureFixture) -> None:
    ns = run_page("index.md")
    err = (ns["lam"].grad - ns["exact"]).abs().max().item()
    assert err < 1e-10
    assert "max |error|" in capsys.readouterr().out


def test_strategies_page_errors(single_thread: None) -> None:
    errors = run_page("concepts/strategies.md")["errors"]
    assert errors["Implicit(CG(maxiter=10))"] < 1e-10
    assert errors["Implicit(DenseSolve())"] < 1e-10
    assert errors["Unrolled()"] < 1e-10
    assert 1e-5 < errors["Implicit(CG(maxiter=3))"] < 1e-1
    # The page states that 20-term Neumann and 20-step truncated unrolling agree once converged.
    assert abs(errors["Implicit(Neumann(steps=20))"] - errors["Unrolled(truncate=20)"]) < 1e-10
    assert 0.1 < errors["Linearized(step=eta)"] < 0.6
    # differences of the gradients of a quadratic: rounding only, central about eps^(2/3), forward eps^(1/2)
    assert errors["Implicit(CG(maxiter=10), CentralDifference())"] < 1e-10
    assert 1e-10 < errors["Implicit(CG(maxiter=10), ForwardDifference())"] < 1e-6


def test_constraints_page_active_set_closed_form(single_thread: None) -> None:
    ns = run_page("concepts/constraints.md")
    active = ns["d"] - len(ns["idx"])
    assert 0 < active < ns["d"]
    assert (ns["x"].grad - ns["exact"]).abs().max().item() < 1e-10
    assert (ns["unconstrained"] - ns["exact"]).abs().max().item() > 1e-2


def test_autograd_page(single_thread: None) -> None:
    ns = run_page("concepts/autograd.md")
    losses = ns["losses"]
    assert losses[-1] < losses[0]
    assert ns["grads"].shape == (4, ns["d"])
    assert ns["meta_grads"].shape == (8, 3) and ns["meta_grad"].abs().max() > 1e-4  # vmap over tasks = the loop
    assert ns["log_decay"].grad is not None and float(ns["log_decay"].grad) != 0.0


def test_tutorial_runs_and_validation_loss_falls(single_thread: None, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    ns = run_page("tutorial.md")
    history = [float(v) for v in ns["history"]]
    assert len(history) == 31
    assert history[-1] < 0.5 * history[0], history
    assert ns["rel_err"]["Implicit(CG(maxiter=30))"] < 1e-4
    assert ns["rel_err"]["Implicit(CG(maxiter=30))"] < ns["rel_err"]["Implicit(CG(maxiter=10))"]
    out = capsys.readouterr().out
    assert "finite difference" in out and "step 30" in out


def test_stochastic_page_methods_learn_the_penalties(single_thread: None, capsys: pytest.CaptureFixture) -> None:
    ns = run_page("stochastic.md")
    # both methods cut the full-batch validation loss by more than 5x from lambda = 0
    assert ns["final"] < 0.2 * ns["start"] and ns["soba_final"] < 0.2 * ns["start"]
    assert ns["amigo"].last_residual.ndim == 0 and ns["state"].step == 1000
    assert set(ns["checkpoint"]["state"]) == {"y", "v", "z", "lam", "step"}
    assert "full-batch validation loss" in capsys.readouterr().out
