r"""The lower problem :math:`y^\star(x) \in \arg\min_{y \in C} g(x, y)`.

The upper problem is an ordinary function :math:`f(x, y)` of the user's: once
``y = bilevel.solve(lower, x, init, strategy)`` is computed, :math:`F(x) = f(x, y^\star(x))` is
differentiated by autograd, and the chosen strategy decides how gradients flow through :math:`y^\star`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

from ._autodiff import value_and_grad_y
from ._tree import Tree, leaves, unflatten
from .constraints import Constraint

__all__ = ["LowerProblem"]


def _is_constraint_leaf(c: Any) -> bool:
    return c is None or isinstance(c, Constraint)


@dataclass(frozen=True)
class LowerProblem:
    r"""A lower problem: objective :math:`g(x, y)`, constraint set :math:`C`, and how to solve it.

    Args:
        objective: ``g(x, y) -> scalar tensor``. It must use ``x`` (the upper variable as passed to
            :func:`bilevel.solve`; for a module, ``dict(module.named_parameters())`` through
            ``torch.func.functional_call``) rather than capturing it, so that strategies can
            differentiate with respect to it.
        constraint: ``None`` (unconstrained), one :class:`~bilevel.Constraint` applied to every leaf of
            ``y``, or a tree of constraints (``None`` for free leaves) matching ``y``'s structure.
        solver: the lower-level solver (:mod:`bilevel.solvers`); :class:`~bilevel.Linearized` does not
            need one.
    """

    objective: Callable[[Tree, Tree], torch.Tensor]
    constraint: Optional[Any] = None
    solver: Optional[Any] = None

    def value_and_grad(self, x: Tree, y: Tree, *, create_graph: bool = False) -> Tuple[torch.Tensor, Tree]:
        r"""Return :math:`g(x, y)` and :math:`\nabla_y g(x, y)`."""
        return value_and_grad_y(self.objective, x, y, create_graph=create_graph)

    def _constraints_for(self, y_flat: List[torch.Tensor]) -> List[Optional[Constraint]]:
        if self.constraint is None:
            return [None] * len(y_flat)
        if isinstance(self.constraint, Constraint):
            return [self.constraint] * len(y_flat)
        cs, _ = pytree.tree_flatten(self.constraint, is_leaf=_is_constraint_leaf)
        if len(cs) != len(y_flat):
            raise ValueError(
                f"LowerProblem: the constraint tree has {len(cs)} leaves but the lower variable has {len(y_flat)}"
            )
        return cs

    def project(self, y: Tree) -> Tree:
        r""":math:`\mathrm{Proj}_C(y)` leaf by leaf (identity where unconstrained)."""
        if self.constraint is None:
            return y
        y_flat, spec = leaves(y)
        return unflatten([t if c is None else c.project(t) for c, t in zip(self._constraints_for(y_flat), y_flat)],
                         spec)

    def free_mask(self, y_flat: List[torch.Tensor], tol: float = 0.0) -> Optional[List[torch.Tensor]]:
        """Per-leaf boolean masks of free (strictly interior) coordinates, or ``None`` if unconstrained."""
        if self.constraint is None:
            return None
        return [torch.ones_like(t, dtype=torch.bool) if c is None else c.free_mask(t, tol)
                for c, t in zip(self._constraints_for(y_flat), y_flat)]

    def check(self, y: Tree) -> None:
        """Validate a lower variable against the constraint's shapes (no host sync)."""
        y_flat, _ = leaves(y)
        for c, t in zip(self._constraints_for(y_flat), y_flat):
            if not t.is_floating_point():
                raise TypeError(f"LowerProblem: the lower variable must be floating point, got {t.dtype}")
            if c is not None:
                c.check_shape(t)
