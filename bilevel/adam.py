r"""A differentiable Adam solver: ``torch.optim.Adam``'s update on tensors, so :class:`bilevel.Unrolled` can
backpropagate through it (MAML with an Adam inner loop).

With :math:`d_k = \nabla_y g(x, y_k; B_k) + \omega y_k` (``weight_decay`` :math:`\omega`, L2 as in
``torch.optim.Adam``; the batch :math:`B_k` as in :class:`bilevel.SGD`),

.. math::

    m_k = \beta_1 m_{k-1} + (1 - \beta_1) d_k, \quad v_k = \beta_2 v_{k-1} + (1 - \beta_2) d_k^2, \quad
    y_{k+1} = \mathrm{Proj}_C\Big(y_k - \eta\, \frac{m_k / (1 - \beta_1^{k+1})}
              {\sqrt{v_k / (1 - \beta_2^{k+1}) + \epsilon_{root}} + \epsilon}\Big),

from :math:`m_{-1} = v_{-1} = 0`. With :math:`\epsilon_{root} = 0` this is ``torch.optim.Adam``'s iterate
exactly; but then a coordinate whose gradient is exactly zero and still depends on :math:`x` (the weight
of an input feature that is zero in every sample, like MNIST's border pixels) has :math:`v = 0`, where
:math:`\sqrt{\cdot}` has an infinite derivative, and the unrolled hypergradient is NaN (0/0).
The default :math:`\epsilon_{root} = 10^{-16}` keeps the derivative finite (TorchOpt's
``eps_root`` plays the same role) and moves the iterate by a relative :math:`O(\epsilon_{root}/v)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

from ._tree import Tree, tree_map
from .problem import LowerProblem
from .solvers import Solver, batch_gradient, check_steps, with_weight_decay
from .stochastic.batches import BatchSource, as_batches

__all__ = ["Adam"]


def _nonnegative(value: Any, name: str, below_one: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or (below_one and value >= 1):
        raise ValueError(f"Adam: {name} must be a finite number {'in [0, 1)' if below_one else '>= 0'}, got {value!r}")


@dataclass(frozen=True)
class Adam(Solver):
    r"""``steps`` iterations of ``torch.optim.Adam``'s update, differentiable (see the module docstring).

    Args:
        step_size: :math:`\eta` (``lr``).
        steps: number of iterations (>= 1).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon`, added to the root.
        eps_root: :math:`\epsilon_{root}`, added under the root (0 reproduces ``torch.optim.Adam`` exactly but
            gives NaN derivatives at exactly-zero gradients).
        weight_decay: :math:`\omega \ge 0` (L2 added to the gradient).
        batches: a batch source; each step draws one batch and uses ``g(x, y, batch)``.
        parallel: a :class:`~bilevel.stochastic.DataParallel`: each step's gradient averaged over the ranks, as
            in :class:`~bilevel.SGD`.
    """

    step_size: float
    steps: int
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16
    weight_decay: float = 0.0
    batches: Optional[BatchSource] = field(default=None, compare=False)
    parallel: Optional[Any] = field(default=None, compare=False)
    _draw: Optional[Callable[[], Any]] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_steps("Adam", self.steps, self.step_size)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"Adam: betas must be a pair (beta1, beta2), got {self.betas!r}")
        _nonnegative(self.betas[0], "betas[0]", below_one=True)
        _nonnegative(self.betas[1], "betas[1]", below_one=True)
        for name in ("eps", "eps_root", "weight_decay"):
            _nonnegative(getattr(self, name), name)
        object.__setattr__(self, "_draw", as_batches(self.batches))

    def step(self, lower: LowerProblem, x: Tree, y: Tree, *, create_graph: bool) -> Tree:
        """The first step of :meth:`run` (fresh moments)."""
        return self.update(lower, x, y, None, 0, create_graph=create_graph)[0]

    def update(self, lower: LowerProblem, x: Tree, y: Tree, moments: Optional[Tuple[Tree, Tree]], k: int, *,
               create_graph: bool) -> Tuple[Tree, Tuple[Tree, Tree]]:
        """Step ``k`` with the moments ``(m, v)`` (``None`` at the first)."""
        d = batch_gradient(lower, x, y, self._draw, self.parallel, self.weight_decay, create_graph)
        b1, b2 = self.betas
        if moments is None:
            m = tree_map(lambda e: (1.0 - b1) * e, d)
            v = tree_map(lambda e: (1.0 - b2) * e * e, d)
        else:
            m = tree_map(lambda a, e: b1 * a + (1.0 - b1) * e, moments[0], d)
            v = tree_map(lambda a, e: b2 * a + (1.0 - b2) * e * e, moments[1], d)
        c1, c2 = 1.0 - b1 ** (k + 1), 1.0 - b2 ** (k + 1)

        def move(t, a, s):
            return t - self.step_size * (a / c1) / ((s / c2 + self.eps_root).sqrt() + self.eps)

        return lower.project(tree_map(move, y, m, v)), (m, v)

    def minimized(self, lower: LowerProblem) -> LowerProblem:
        """``lower`` plus the weight decay's L2 term: what this solver's fixed points minimize."""
        return with_weight_decay(lower, self.weight_decay)
