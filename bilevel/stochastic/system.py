r"""The implicit linear system on mini-batches, for the stochastic implicit strategies.

At the lower solution :math:`y^\star` with free-coordinate mask :math:`D` (identity without
constraints) and damping :math:`\rho`, the backward pass of an implicit hypergradient solves

.. math:: A_B\, u = D\,\bar y, \qquad A_B = D\, \nabla^2_{yy} g(x, y^\star, B)\, D + (I - D) + \rho I,

where :math:`\bar y = \partial f / \partial y^\star` and :math:`B` is a mini-batch, and returns
:math:`-\nabla^2_{xy} g(x, y^\star, B')\, u` on a batch :math:`B'`. Every batch gets its own
linearization (one forward and one gradient graph of :math:`g` on it).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch

from .._autodiff import ExactProducts
from .._tree import to_vector
from ..hypergrad.implicit import masked_operator
from ..problem import LowerProblem
from .parallel import DataParallel, mean_over

__all__ = ["BatchSystem"]


class BatchSystem:
    """The masked implicit system at ``(x, y*)``, with one operator per mini-batch."""

    def __init__(self, lower: LowerProblem, x_flat: Sequence[torch.Tensor], x_spec: Any,
                 y_flat: Sequence[torch.Tensor], y_spec: Any, *, damping: float = 0.0, mask_tol: float = 0.0,
                 parallel: Optional[DataParallel] = None) -> None:
        self.lower, self.x_flat, self.x_spec, self.y_flat, self.y_spec = lower, list(x_flat), x_spec, list(y_flat), y_spec
        self.rho, self.parallel = damping, parallel
        masks = lower.free_mask(self.y_flat, mask_tol, y_spec)
        like = to_vector([t.detach() for t in self.y_flat])
        self.mask: Optional[torch.Tensor] = None if masks is None else to_vector(masks).to(like.dtype)

    def linearization(self, batch: Any) -> ExactProducts:
        """Second-order information of :math:`g(\\cdot, \\cdot, B)` at ``(x, y*)``."""
        return ExactProducts(self.lower.on(batch).objective, self.x_flat, self.x_spec, self.y_flat, self.y_spec)

    def operator(self, batch: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        r"""The matrix-vector product :math:`u \mapsto A_B u` on batch ``batch`` (averaged over ranks with ``parallel``)."""
        hvp = self.linearization(batch).hvp
        if self.parallel is not None:
            local = hvp
            hvp = lambda v: mean_over(self.parallel, [local(v)])[0]  # noqa: E731
        return masked_operator(hvp, self.mask, self.rho)

    def rhs(self, v_flat: Sequence[torch.Tensor]) -> torch.Tensor:
        r""":math:`D \bar y` as a flat vector (:math:`\bar y` averaged over ranks with ``parallel``)."""
        b = to_vector(mean_over(self.parallel, [t.to(y.dtype) for t, y in zip(v_flat, self.y_flat)]))
        return b if self.mask is None else self.mask * b

    def hypergradient(self, batch: Any, u: torch.Tensor) -> List[torch.Tensor]:
        r""":math:`-\nabla^2_{xy} g(x, y^\star, B)\, D u` per leaf of ``x``."""
        if self.mask is not None:
            u = self.mask * u
        return [-t for t in mean_over(self.parallel, self.linearization(batch).cross(u))]
