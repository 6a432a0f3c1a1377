r"""The lower problem :math:`y^\star(x) \in \arg\min_{y \in C} g(x, y)`.

The upper problem is an ordinary function :math:`f(x, y)` of the user's: once
``y = bilevel.solve(lower, x, init, strategy)`` is computed, :math:`F(x) = f(x, y^\star(x))` is
differentiated by autograd, and the chosen strategy decides how gradients flow through :math:`y^\star`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Protocol, Tuple, Union, runtime_checkable

import torch
from torch.utils import _pytree as pytree

from ._autodiff import value_and_grad_y
from ._tree import Tree, leaves, unflatten
from .constraints import Constraint

__all__ = ["LowerProblem", "LowerSolver", "ConstraintTree"]

#: ``None``, one :class:`~bilevel.Constraint`, or a dict / list / tuple of these matching the lower variable.
ConstraintTree = Union[None, Constraint, Mapping, list, tuple]


@runtime_checkable
class LowerSolver(Protocol):
    """What a lower problem's solver provides: :class:`~bilevel.Solver` subclasses and :class:`~bilevel.TorchOptim`."""

    steps: int

    def run(self, lower: LowerProblem, x: Tree, init: Tree, *, differentiable_steps: int = 0) -> Tree:
        """Run the solver from ``init`` at ``x``; the last ``differentiable_steps`` steps keep an autograd graph."""
        ...


def _is_constraint_leaf(c: Any) -> bool:
    return c is None or isinstance(c, Constraint)


def _assign(c: Any, node: Any, out: List[Optional[Constraint]], path: str) -> None:
    """Match the constraint tree ``c`` against ``node`` (the lower variable's tree with leaf indices).

    A constraint (or ``None``) at an inner node applies to every leaf below it. Dicts are matched by key,
    not by insertion order, so ``{"a": C, "b": None}`` constrains ``y["a"]`` whatever the key order of ``y``.
    """
    if _is_constraint_leaf(c):
        for i in pytree.tree_flatten(node)[0]:
            out[i] = c
    elif isinstance(node, int):
        raise ValueError(f"LowerProblem: the constraint tree has a {type(c).__name__} at {path} where the lower "
                         "variable has a tensor; put a Constraint or None there")
    elif isinstance(node, Mapping):
        if not isinstance(c, Mapping) or set(c.keys()) != set(node.keys()):
            def show(keys) -> str:
                return ", ".join(sorted(map(repr, keys)))

            what = f"has keys {show(c.keys())}" if isinstance(c, Mapping) else f"is a {type(c).__name__}"
            raise ValueError(f"LowerProblem: the constraint tree at {path} {what} but the lower variable has keys "
                             f"{show(node.keys())}")
        for k in node:
            _assign(c[k], node[k], out, f"{path}[{k!r}]")
    elif isinstance(node, (list, tuple)):
        if not isinstance(c, (list, tuple)) or len(c) != len(node):
            what = f"{len(c)} entries" if isinstance(c, (list, tuple)) else f"a {type(c).__name__}"
            raise ValueError(f"LowerProblem: the constraint tree at {path} has {what} but the lower "
                             f"variable has {len(node)} entries")
        for i, (ci, ni) in enumerate(zip(c, node)):
            _assign(ci, ni, out, f"{path}[{i}]")
    else:  # another pytree node type: match leaves by position
        cs = pytree.tree_flatten(c, is_leaf=_is_constraint_leaf)[0]
        idx = pytree.tree_flatten(node)[0]
        if len(cs) != len(idx):
            raise ValueError(f"LowerProblem: the constraint tree at {path} has {len(cs)} leaves but the lower "
                             f"variable has {len(idx)}")
        for i, ci in zip(idx, cs):
            out[i] = ci


@dataclass(frozen=True)
class LowerProblem:
    r"""A lower problem: objective :math:`g(x, y)`, constraint set :math:`C`, and how to solve it.

    Args:
        objective: ``g(x, y) -> scalar tensor`` (``g(x, y, batch)`` for the mini-batch solvers and methods,
            see :meth:`on`). It must use ``x`` (the upper variable as passed to
            :func:`bilevel.solve`; for a module, ``dict(module.named_parameters())`` through
            ``torch.func.functional_call``) rather than capturing it, so that strategies can
            differentiate with respect to it. Strategies re-evaluate ``g`` (Hessian-vector products,
            finite differences, residual checks), so it must be deterministic and free of side effects:
            no dropout, no in-place updates of captured state; for a network use
            :func:`bilevel.functional`, which never writes BatchNorm running statistics.
        constraint: ``None`` (unconstrained), one :class:`~bilevel.Constraint` applied to every leaf of
            ``y``, or a tree of constraints (``None`` for free leaves) matching ``y``'s structure (dicts by
            key; a constraint at an inner node applies to every leaf below it).
        solver: the lower-level solver (:mod:`bilevel.solvers`); :class:`~bilevel.Linearized` does not
            need one.
    """

    objective: Callable[..., torch.Tensor]
    constraint: ConstraintTree = None
    solver: Optional[LowerSolver] = None

    def __post_init__(self) -> None:
        if not callable(self.objective):
            raise TypeError(f"LowerProblem: the objective must be a function g(x, y), got {type(self.objective).__name__}")
        if self.solver is not None and not isinstance(self.solver, LowerSolver):
            raise TypeError(f"LowerProblem: the solver must provide steps and run(lower, x, init, differentiable_steps=...) "
                            f"(e.g. bilevel.GradientDescent, bilevel.TorchOptim), got {self.solver!r}")

    def on(self, batch: Any) -> LowerProblem:
        r"""The same problem on one mini-batch: objective :math:`(x, y) \mapsto g(x, y, \text{batch})`.

        Stochastic solvers and methods (:mod:`bilevel.stochastic`) call an objective of the form
        ``g(x, y, batch)``; this binds one batch so that the deterministic machinery (solvers, strategies,
        :meth:`value_and_grad`) sees an ordinary ``g(x, y)``.
        """
        objective = self.objective

        def on_batch(x: Tree, y: Tree) -> torch.Tensor:
            return objective(x, y, batch)

        return replace(self, objective=on_batch)

    def value_and_grad(self, x: Tree, y: Tree, *, create_graph: bool = False) -> Tuple[torch.Tensor, Tree]:
        r"""Return :math:`g(x, y)` and :math:`\nabla_y g(x, y)`."""
        return value_and_grad_y(self.objective, x, y, create_graph=create_graph)

    def _constraints_for(self, y_flat: List[torch.Tensor], spec: Any = None) -> List[Optional[Constraint]]:
        if self.constraint is None:
            return [None] * len(y_flat)
        if isinstance(self.constraint, Constraint):
            return [self.constraint] * len(y_flat)
        if spec is not None:
            out: List[Optional[Constraint]] = [None] * len(y_flat)
            _assign(self.constraint, pytree.tree_unflatten(list(range(len(y_flat))), spec), out, "the root")
            return out
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
        return unflatten([t if c is None else c.project(t) for c, t in zip(self._constraints_for(y_flat, spec), y_flat)],
                         spec)

    def free_mask(self, y_flat: List[torch.Tensor], tol: float = 0.0, spec: Any = None) -> Optional[List[torch.Tensor]]:
        """Per-leaf boolean masks of free (strictly interior) coordinates, or ``None`` if unconstrained.

        ``spec`` (the lower variable's tree spec) lets a constraint tree be matched by structure (dict
        keys); without it the constraint tree's leaves are matched to ``y_flat`` by position.
        """
        if self.constraint is None:
            return None
        return [torch.ones_like(t, dtype=torch.bool) if c is None else c.free_mask(t, tol)
                for c, t in zip(self._constraints_for(y_flat, spec), y_flat)]

    def check(self, y: Tree) -> None:
        """Validate a lower variable against the constraint's shapes (no host sync)."""
        y_flat, spec = leaves(y)
        if sum(t.numel() for t in y_flat) == 0:  # shapes only: no host sync
            raise ValueError("LowerProblem: the lower variable (init) has no elements; a lower problem needs at least one "
                             "coordinate to solve for")
        for c, t in zip(self._constraints_for(y_flat, spec), y_flat):
            if not t.is_floating_point():
                raise TypeError(f"LowerProblem: the lower variable must be floating point, got {t.dtype}")
            if c is not None:
                c.check_shape(t)
