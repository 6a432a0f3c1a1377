"""The strategy interface: how gradients flow through the lower solution."""

from __future__ import annotations

from typing import Optional, Tuple

from .._tree import Tree
from ..problem import LowerProblem

__all__ = ["Strategy"]


class Strategy:
    r"""A hypergradient strategy. ``strategy.solve(lower, x, init)`` returns :math:`y^\star(x)` whose
    autograd graph to ``x`` encodes the strategy's approximation of :math:`\mathrm{d}y^\star/\mathrm{d}x`."""

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:  # pragma: no cover - interface
        raise NotImplementedError

    def _unreached_note(self) -> Optional[Tuple[str, str]]:
        """For :func:`bilevel.solve`'s first-solve check that :math:`y^\\star` has an autograd path to ``x``: ``None``
        when this strategy is not checked that way (the default: first order by design, or checked elsewhere),
        else the (cause, remedy) texts its warning adds."""
        return None

    @staticmethod
    def _solver(lower: LowerProblem, who: str):
        if lower.solver is None:
            raise ValueError(f"{who}: the lower problem has no solver (LowerProblem(..., solver=...))")
        return lower.solver
