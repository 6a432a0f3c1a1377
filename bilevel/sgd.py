r"""A differentiable SGD solver: heavy-ball momentum, weight decay, Nesterov, a fresh mini-batch per step.

``torch.optim.SGD``'s update, written on tensors so that :class:`bilevel.Unrolled` can backpropagate
through it (the momentum buffer carries the graph from step to step):

.. math::

    d_k = \nabla_y g(x, y_k; B_k) + \omega\, y_k, \qquad
    b_k = \begin{cases} d_k & k = 0 \\ \mu\, b_{k-1} + (1 - \tau)\, d_k & k > 0 \end{cases}, \qquad
    y_{k+1} = \mathrm{Proj}_C\big(y_k - \eta\, (d_k + \mu b_k \text{ if Nesterov else } b_k)\big),

with :math:`\eta` = ``step_size``, :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``, :math:`\omega` =
``weight_decay`` and :math:`B_k` the ``k``-th batch of ``batches`` (the full objective ``g(x, y)`` without).
DARTS's virtual step (Liu et al., 2019, Eq. 6-7) and MAML with a momentum inner loop are this solver
under :class:`~bilevel.Unrolled`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

from ._tree import Tree, tree_map
from .problem import LowerProblem
from .solvers import Solver, batch_gradient, check_steps, with_weight_decay
from .stochastic.batches import BatchSource, as_batches

__all__ = ["SGD"]


def _unit_interval(value: Any, name: str, upper_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or value > 1 or (upper_open and value == 1):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"SGD: {name} must be a number in {bound}, got {value!r}")


@dataclass(frozen=True)
class SGD(Solver):
    r"""``steps`` iterations of ``torch.optim.SGD``'s update, differentiable (see the module docstring).

    Args:
        step_size: :math:`\eta` (``lr`` in ``torch.optim.SGD``).
        steps: number of iterations (>= 1).
        momentum: :math:`\mu \in [0, 1)`; the buffer starts at the first direction, as in ``torch.optim.SGD``.
        weight_decay: :math:`\omega \ge 0`, added to the gradient as :math:`\omega y`.
        dampening: :math:`\tau \in [0, 1]`.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``).
        batches: a batch source (callable or iterable; :func:`bilevel.stochastic.as_batches`): each step
            draws one batch and uses ``g(x, y, batch)``. ``None``: every step uses ``g(x, y)``.
        parallel: a :class:`~bilevel.stochastic.DataParallel`: each step's batch gradient is averaged over the
            ranks (one ``all_reduce`` per step, kept in the graph for the unrolled steps), so P processes step as
            one process on the concatenated batch, and :class:`~bilevel.Unrolled` differentiates that.
    """

    step_size: float
    steps: int
    momentum: float = 0.0
    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    batches: Optional[BatchSource] = field(default=None, compare=False)
    parallel: Optional[Any] = field(default=None, compare=False)
    _draw: Optional[Callable[[], Any]] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_steps("SGD", self.steps, self.step_size)
        _unit_interval(self.momentum, "momentum", upper_open=True)
        _unit_interval(self.dampening, "dampening")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or not (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"SGD: weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        object.__setattr__(self, "_draw", as_batches(self.batches))

    def step(self, lower: LowerProblem, x: Tree, y: Tree, *, create_graph: bool) -> Tree:
        """One step from a fresh momentum buffer (the first step of :meth:`run`)."""
        return self.update(lower, x, y, None, 0, create_graph=create_graph)[0]

    def update(self, lower: LowerProblem, x: Tree, y: Tree, buf: Optional[Tree], k: int, *, create_graph: bool
               ) -> Tuple[Tree, Optional[Tree]]:
        """Step ``k`` with the momentum buffer ``buf`` (``None`` at the first)."""
        d = batch_gradient(lower, x, y, self._draw, self.parallel, self.weight_decay, create_graph)
        if self.momentum:
            buf = d if buf is None else tree_map(lambda b, e: self.momentum * b + (1.0 - self.dampening) * e, buf, d)
            d = tree_map(lambda e, b: e + self.momentum * b, d, buf) if self.nesterov else buf
        return lower.project(tree_map(lambda t, e: t - self.step_size * e, y, d)), buf

    def minimized(self, lower: LowerProblem) -> LowerProblem:
        """``lower`` plus the weight decay's L2 term: what this solver's fixed points minimize."""
        return with_weight_decay(lower, self.weight_decay)
