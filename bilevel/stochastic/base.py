r"""Shared parts of the stochastic implicit strategies (:class:`AmIGO`, :class:`StocBiO`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from .._tree import Tree, is_vmapped
from ..hypergrad.base import Strategy
from ..hypergrad.implicit import implicit_solution
from ..linalg import LinearSolveInfo
from ..problem import LowerProblem
from .batches import as_batches
from .system import BatchSystem

__all__ = ["StochasticImplicit"]


def _refuse_vmap(name: str) -> None:
    if is_vmapped():
        raise TypeError(f"{name} under vmap: the stochastic methods draw their own mini-batches and keep state on the "
                        "strategy object, one stream for every task; loop over the tasks, or use Implicit under vmap")


@dataclass(eq=False)
class StochasticImplicit(Strategy):
    r"""An implicit hypergradient whose linear system is solved on fresh mini-batches.

    The forward pass is ``lower.solver`` from ``init`` (typically :class:`~bilevel.TorchOptim` on
    mini-batches, warm-started by passing the previous solution as ``init``); the backward pass builds a
    :class:`BatchSystem`, calls :meth:`solve_system` and returns the cross derivative on one more fresh
    batch, independent of those of the system, so that it multiplies :math:`u` without correlation.
    Subclasses define :meth:`solve_system`.

    Args:
        batches: the source of lower batches (callable, iterable or ``DataLoader``); the objective is called
            as ``g(x, y, batch)``.
        steps: the number of stochastic iterations on the linear system.
        step_size: their step :math:`\eta` (stable for :math:`\eta < 2 / L`, :math:`L` the largest eigenvalue
            of :math:`\nabla^2_{yy} g`).
        damping: :math:`\rho` added to the system.
        mask_tol: a coordinate is free when it is more than ``mask_tol`` inside both bounds.
        residual: a :class:`~bilevel.ResidualCheck` run after the forward solve.
        parallel: a :class:`~bilevel.stochastic.DataParallel`: the cotangent :math:`\bar y`, every
            Hessian-vector product and the cross product are averaged over the ranks (one ``all_reduce`` each:
            ``steps + 2`` per backward pass).

    Attributes:
        last_info: :class:`~bilevel.LinearSolveInfo` of the latest backward pass.
        last_residual: the lower residual of the latest forward solve, with ``residual``.
    """

    batches: Any
    steps: int = 10
    step_size: float = 0.5
    damping: float = 0.0
    mask_tol: float = 0.0
    residual: Optional[Any] = None
    parallel: Optional[Any] = None
    last_info: Optional[LinearSolveInfo] = field(default=None, init=False, repr=False)
    last_residual: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.batches is None:
            raise ValueError(f"{name}: batches is required (a callable, iterable or DataLoader of lower batches)")
        self.batches = as_batches(self.batches)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"{name}: steps must be an integer >= 1, got {self.steps}")
        if not self.step_size > 0:
            raise ValueError(f"{name}: step_size must be > 0, got {self.step_size}")
        if not self.damping >= 0:
            raise ValueError(f"{name}: damping must be >= 0, got {self.damping}")

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
        self._solver(lower, type(self).__name__)
        _refuse_vmap(type(self).__name__)
        return implicit_solution(self, lower, x, init)

    def solve_system(self, system: BatchSystem, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, lower: LowerProblem, x_flat: List[torch.Tensor], x_spec: Any, y_flat: List[torch.Tensor],
                 y_spec: Any, v_flat: List[torch.Tensor]) -> List[torch.Tensor]:
        _refuse_vmap(type(self).__name__)  # jacrev batches the backward pass alone
        system = BatchSystem(lower, x_flat, x_spec, y_flat, y_spec, damping=self.damping, mask_tol=self.mask_tol,
                             parallel=self.parallel)
        u = self.solve_system(system, system.rhs(v_flat))
        return system.hypergradient(self.batches(), u)
