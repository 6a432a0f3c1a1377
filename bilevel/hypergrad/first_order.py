r"""First-order hypergradient: :math:`y^\star` is a constant (Danskin's theorem)."""

from __future__ import annotations

from dataclasses import dataclass

from .._autodiff import detach_tree
from .._tree import Tree
from ..problem import LowerProblem
from .base import Strategy

__all__ = ["FirstOrder"]


@dataclass(frozen=True)
class FirstOrder(Strategy):
    r"""Treat the lower solution as independent of ``x``: :math:`\mathrm{d}F/\mathrm{d}x \approx \nabla_x f(x, y^\star)`.

    Exact when :math:`f = g` at an unconstrained (or :math:`x`-independent-constraint) minimizer, by
    Danskin's theorem: this is the gradient of min-max adversarial training (PGD-AT, Fast-AT). Costs
    nothing beyond the lower solve, which runs without a graph.
    """

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
        solver = self._solver(lower, "FirstOrder")
        # run() detaches x and init itself; the output detach keeps the guarantee for solvers that override run()
        return detach_tree(solver.run(lower, x, init, differentiable_steps=0))
