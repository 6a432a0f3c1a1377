r"""StocBiO (Ji, Yang & Liang, ICML 2021): a mini-batch Neumann series for the inverse-Hessian-vector product."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import LinearSolveInfo
from .base import StochasticImplicit
from .system import BatchSystem

__all__ = ["StocBiO"]


@dataclass(eq=False)
class StocBiO(StochasticImplicit):
    r"""Implicit hypergradient with :math:`A^{-1}` replaced by a Neumann series whose factors use independent batches.

    .. math:: u = \eta \sum_{q=0}^{Q-1} \prod_{k=1}^{q} \big(I - \eta A_{B_k}\big)\, D\bar y,
              \qquad A_B = D\,\nabla^2_{yy} g(x, y^\star, B)\,D + (I - D),

    computed as :math:`p_0 = \eta D\bar y`, :math:`p_k = p_{k-1} - \eta A_{B_k} p_{k-1}`, :math:`u = \sum_k p_k`
    (:math:`Q - 1` Hessian-vector products, each on a fresh batch :math:`B_k`), then
    :math:`-\nabla^2_{xy} g(x, y^\star, B')\, u` on one more fresh batch. The forward pass is
    ``lower.solver`` from ``init`` (StocBiO warm-starts the inner SGD from the previous solution).

    Bias and variance: the factors are independent, so :math:`\mathbb E[u]` is exactly the full-batch
    :math:`Q`-term series, and with the independent cross batch the hypergradient is an unbiased estimate
    of the full-batch :math:`Q`-term Neumann hypergradient at the same :math:`y^\star`; its bias to the
    exact one is :math:`\|(I - \eta A)^Q\|`, geometric in :math:`Q`. Cost: :math:`Q` forward passes of
    :math:`g` on a batch with a gradient and a double backward.

    Args:
        batches: the source of the lower batches :math:`B_k, B'` (``g(x, y, batch)``).
        steps: :math:`Q`, the number of Neumann *terms*: :math:`Q - 1` Hessian-vector products. benchopt's
            ``n_shia_steps`` and the paper's loop count products: ``steps = n_shia_steps + 1``.
        step_size: :math:`\eta < 2 / L`; damping, mask_tol, residual: see :class:`StochasticImplicit`.

    Attributes:
        last_info: :class:`~bilevel.LinearSolveInfo` with the norm of the last term :math:`\|p_{Q-1}\|`.
        last_residual: the lower residual, with ``residual``.
    """

    def solve_system(self, system: BatchSystem, b: torch.Tensor) -> torch.Tensor:
        eta = self.step_size
        p = eta * b
        u = p
        for _ in range(self.steps - 1):
            p = torch.add(p, system.operator(self.batches())(p), alpha=-eta)
            u = u + p
        self.last_info = LinearSolveInfo(torch.linalg.vector_norm(p), torch.linalg.vector_norm(b), self.steps)
        return u
