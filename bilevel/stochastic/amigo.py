r"""AmIGO (Arbel & Mairal, ICLR 2022): warm-started stochastic solves of the lower problem and the linear system."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..linalg import LinearSolveInfo
from .base import StochasticImplicit
from .system import BatchSystem

__all__ = ["AmIGO"]


@dataclass(eq=False)
class AmIGO(StochasticImplicit):
    r"""Implicit hypergradient with the linear system solved by warm-started SGD on mini-batches.

    Per outer step (Arbel & Mairal, 2022, Algorithm 2):

    1. the forward pass runs ``lower.solver`` from ``init``: with :class:`~bilevel.TorchOptim` (SGD) on
       mini-batches and ``init`` the previous solution, these are AmIGO's :math:`T` warm-started inner steps;
    2. the backward pass, given :math:`\bar y = \nabla_y f(x, y, B_f)` from the user's upper batch, takes
       ``steps`` :math:`K` SGD steps on the quadratic :math:`\tfrac12 u^\top A u - u^\top \bar y`, each on a
       fresh lower batch :math:`B_k`, starting from the previous outer step's :math:`u`:

       .. math:: u \leftarrow u - \eta\,\big(A_{B_k} u - D\bar y\big), \qquad A_B = D\,\nabla^2_{yy} g(x, y, B)\,D + (I - D),

    3. and returns :math:`-\nabla^2_{xy} g(x, y, B')\, u` on one more fresh batch :math:`B'`, so that
       ``f(x, y, B_f).backward()`` leaves :math:`\nabla_x f(x, y, B_f) - \nabla^2_{xy} g(x, y, B') u` in ``x.grad``.

    Bias and variance: :math:`u` is a stochastic approximation of :math:`A^{-1} D \bar y` (biased by the
    finite :math:`K`; the warm start makes :math:`K` small steps enough once the outer iterates settle);
    given :math:`u`, the cross term is unbiased (independent batch). Cost per outer step: the inner steps
    plus :math:`K + 1` forward passes of :math:`g` on a batch, each with a gradient and a double backward.

    Args:
        batches: the source of the lower batches :math:`B_k, B'` (``g(x, y, batch)``).
        steps: :math:`K`, SGD steps on the linear system per outer step.
        step_size: :math:`\eta`; damping, mask_tol, residual: see :class:`StochasticImplicit`.

    Attributes:
        last_solution: :math:`u` of the latest backward pass (the warm start; ``None`` starts at 0). It is the
            state to save in a checkpoint (:meth:`state_dict`).
        last_info: :class:`~bilevel.LinearSolveInfo` with :math:`\|A_{B_K} u_{K-1} - D\bar y\|` (the last
            stochastic gradient of the quadratic).
        last_residual: the lower residual, with ``residual``.
    """

    last_solution: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    def state_dict(self) -> Dict[str, Optional[torch.Tensor]]:
        """The warm start :math:`u`, for checkpoints."""
        return {"last_solution": self.last_solution}

    def load_state_dict(self, state: Dict[str, Optional[torch.Tensor]]) -> None:
        self.last_solution = state["last_solution"]

    def solve_system(self, system: BatchSystem, b: torch.Tensor) -> torch.Tensor:
        u = self.last_solution
        u = torch.zeros_like(b) if u is None or u.shape != b.shape else u.to(b.dtype)
        eta = self.step_size
        for _ in range(self.steps):
            r = system.operator(self.batches())(u) - b
            u = torch.add(u, r, alpha=-eta)
        self.last_solution = u.detach()
        self.last_info = LinearSolveInfo(torch.linalg.vector_norm(r), torch.linalg.vector_norm(b), self.steps)
        return u
