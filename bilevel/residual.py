r"""Convergence diagnostic of a lower solve: the projected-gradient residual, as a device tensor.

.. math:: r(x, y) = \frac{1}{\eta}\,\big\|y - \mathrm{Proj}_C\big(y - \eta \nabla_y g(x, y)\big)\big\|_2

It is zero exactly at a solution of :math:`\min_{y \in C} g(x, y)` (for convex :math:`g`), equals
:math:`\|\nabla_y g\|` without constraints, and is what an implicit hypergradient silently assumes
to be zero: after too few inner steps the hypergradient can be entirely wrong and nothing else says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._autodiff import detach_tree
from ._tree import Tree, leaves, plain_values, to_vector, tree_map
from .problem import LowerProblem

__all__ = ["lower_residual", "ResidualCheck", "LowerSolveError"]


class LowerSolveError(RuntimeError):
    """The lower problem was not solved to the requested residual."""


def lower_residual(lower: LowerProblem, x: Tree, y: Tree, step: float = 1.0, *, batch: Any = None) -> torch.Tensor:
    r""":math:`\|y - \mathrm{Proj}_C(y - \eta \nabla_y g(x, y))\| / \eta` with :math:`\eta` = ``step`` (a 0-d tensor).

    One gradient of :math:`g`, no graph, no host sync. With ``batch``, :math:`g` is the objective on that
    batch (``g(x, y, batch)``); without, the full objective ``g(x, y)``.
    """
    if not step > 0:
        raise ValueError(f"lower_residual: step must be > 0, got {step}")
    problem = lower if batch is None else lower.on(batch)
    y = detach_tree(y)
    _, grad = problem.value_and_grad(x, y)
    moved = problem.project(tree_map(lambda t, d: t - step * d, y, grad))
    return torch.linalg.vector_norm(to_vector(leaves(y)[0]) - to_vector(leaves(moved)[0])) / step


@dataclass(frozen=True)
class ResidualCheck:
    r"""Compute :func:`lower_residual` after each lower solve, and optionally check it.

    Strategies that accept it (:class:`~bilevel.Implicit`, :class:`~bilevel.stochastic.AmIGO`,
    :class:`~bilevel.stochastic.StocBiO`) store the tensor in ``last_residual``, beside ``last_info``.

    Args:
        step: :math:`\eta` of the residual (use the solver's step size).
        tol: if set, :meth:`check` runs after each solve: it reads the residual (one host sync) and raises
            :class:`LowerSolveError` when it exceeds ``tol`` (a warning with ``warn=True``). ``None``
            (default): the residual is only computed, never read.
        warn: warn instead of raising.
        batches: a batch source for mini-batch objectives ``g(x, y, batch)`` (the residual is then that of
            one fresh batch); ``None`` uses ``g(x, y)``.
    """

    step: float = 1.0
    tol: Optional[float] = None
    warn: bool = False
    batches: Optional[Any] = None

    def __post_init__(self) -> None:
        if not self.step > 0:
            raise ValueError(f"ResidualCheck: step must be > 0, got {self.step}")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"ResidualCheck: tol must be None or >= 0, got {self.tol}")

    def __call__(self, lower: LowerProblem, x: Tree, y: Tree) -> torch.Tensor:
        batch = None if self.batches is None else self.batches()
        residual = lower_residual(lower, x, y, self.step, batch=batch)
        if self.tol is not None:
            self.check(residual)
        return residual

    def check(self, residual: torch.Tensor) -> None:
        """Raise (or warn) if ``residual > tol``. Reads one scalar from the device: a host sync."""
        value = float(plain_values(residual).max())  # the worst task under vmap
        if self.tol is not None and not value <= self.tol:
            msg = (f"the lower solve is not converged: residual ||y - Proj(y - step grad g)|| / step = {value:.3g} > "
                   f"tol = {self.tol:.3g}; the hypergradient assumes a solution (run more inner steps or warm-start)")
            if self.warn:
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
            else:
                raise LowerSolveError(msg)
