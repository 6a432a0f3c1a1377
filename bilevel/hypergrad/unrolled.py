r"""Unrolled hypergradient: backpropagation through the lower solver's iterations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._tree import Tree
from ..problem import LowerProblem
from .base import Strategy

__all__ = ["Unrolled"]


@dataclass(frozen=True)
class Unrolled(Strategy):
    r"""Differentiate through the solver's iterations :math:`y_{k+1} = \Phi(x, y_k)`.

    With :math:`K` steps from an ``x``-independent start, autograd computes
    :math:`\mathrm{d}y_K/\mathrm{d}x = \sum_{k<K} \big(\prod_{j>k} \partial_y \Phi_j\big) \partial_x \Phi_k` exactly.
    When every step is unrolled the graph starts at ``init`` itself, so a start that depends on the upper
    variable is differentiated too: MAML's ``solve(lower, theta, theta, Unrolled())`` gets
    :math:`\prod_j \partial_y \Phi_j` through its start. ``truncate=T`` keeps only the last :math:`T` steps in
    the graph (truncated backpropagation): the first :math:`K-T` run without a graph and their output is
    treated as a constant start.

    Cost: memory grows linearly with the number of differentiated steps, each of which also needs a
    double backward at backward time.

    Args:
        truncate: number of final steps to differentiate through (``None``: all).
    """

    truncate: Optional[int] = None

    def __post_init__(self) -> None:
        if self.truncate is not None and self.truncate < 0:
            raise ValueError(f"Unrolled: truncate must be >= 0, got {self.truncate}")

    def _unreached_note(self) -> Optional[Tuple[str, str]]:
        if self.truncate == 0:
            return None  # first order by design
        if self.truncate is None:
            return ", and init does not depend on x", "; for MAML, pass x as init too (solve(lower, theta, theta, ...))"
        return f", and truncate={self.truncate} makes the start a constant", ""

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
        solver = self._solver(lower, "Unrolled")
        steps = solver.steps if self.truncate is None else min(self.truncate, solver.steps)
        if not torch.is_grad_enabled():
            steps = 0
        return solver.run(lower, x, init, differentiable_steps=steps)
