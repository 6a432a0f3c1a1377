r"""How the strategies take second-order products: by double backward or by differences of gradients.

:class:`~bilevel.Implicit` needs Hessian-vector products :math:`\nabla^2_{yy} g\, v` and one mixed
product :math:`\nabla^2_{xy} g\, u`; :class:`~bilevel.Linearized` needs the mixed product
:math:`\tfrac{\mathrm{d}}{\mathrm{d}x}\langle \nabla_y g(x, z), u\rangle` (Fast-BAT's implicit gradient).
Both take an option ``products=``:

* :class:`Exact` (the default): double backward through the graph of :math:`\nabla_y g`.
* :class:`CentralDifference`: :math:`(G(y + hv) - G(y - hv)) / 2h` of first-order gradients, error
  :math:`O(h^2)` plus rounding, two gradient evaluations per product.
* :class:`ForwardDifference`: :math:`(G(y + hv) - G(y)) / h`, error :math:`O(h)` plus rounding, one
  gradient evaluation per product plus the gradient at the point, computed once (and for
  ``Linearized`` in the same pass as the value it needs anyway).

The step rule, the error model and the requirements on :math:`g` are in :mod:`bilevel.differences`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ._autodiff import ExactProducts, Objective, SecondOrderProducts, value_and_grad_y
from ._tree import Tree, leaves, unflatten
from .differences import DifferencedGradient, DifferenceProducts

__all__ = ["Products", "Exact", "CentralDifference", "ForwardDifference", "check_products"]


class Products:
    """How second-order products of the lower objective are taken (the interface of the ``products=`` option)."""

    def at(self, objective: Objective, x_flat: Sequence[torch.Tensor], x_spec: Any, y_flat: Sequence[torch.Tensor],
           y_spec: Any) -> SecondOrderProducts:
        """The products (``hvp``, ``hvp_batched``, ``cross``) of ``objective`` at the point (x, y)."""
        raise NotImplementedError  # pragma: no cover - interface

    def grad_y(self, objective: Objective, x: Tree, y: Tree) -> Tree:
        r""":math:`\nabla_y g(x, y)`, whose autograd derivative in ``x`` is this option's mixed product (``y`` constant)."""
        raise NotImplementedError  # pragma: no cover - interface


@dataclass(frozen=True)
class Exact(Products):
    r"""Second-order products by double backward: exact up to rounding (the default).

    Composes with every ``torch.func`` transform; needs operations that have a double backward
    (``torch.compile``'d graphs and the fused attention kernels do not).
    """

    def at(self, objective: Objective, x_flat: Sequence[torch.Tensor], x_spec: Any, y_flat: Sequence[torch.Tensor],
           y_spec: Any) -> SecondOrderProducts:
        return ExactProducts(objective, x_flat, x_spec, y_flat, y_spec)

    def grad_y(self, objective: Objective, x: Tree, y: Tree) -> Tree:
        return value_and_grad_y(objective, x, y, create_graph=True)[1]


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


class _Difference(Products):
    central: bool
    h: Optional[float]
    scale: float
    distance: Optional[float]

    def __post_init__(self) -> None:
        who = type(self).__name__
        if self.h is not None and not _positive(self.h):
            raise ValueError(f"{who}: h must be None (the step rule) or a finite number > 0, got {self.h!r}")
        if not _positive(self.scale):
            raise ValueError(f"{who}: scale must be a finite number > 0, got {self.scale!r}")
        if self.distance is not None and not _positive(self.distance):
            raise ValueError(f"{who}: distance must be None or a finite number > 0, got {self.distance!r}")
        if sum([self.h is not None, self.scale != 1.0, self.distance is not None]) > 1:
            raise ValueError(f"{who}: give one of h (a fixed step), distance (a fixed move of the point) or scale "
                             "(a factor on the rule's step)")

    def at(self, objective: Objective, x_flat: Sequence[torch.Tensor], x_spec: Any, y_flat: Sequence[torch.Tensor],
           y_spec: Any) -> SecondOrderProducts:
        return DifferenceProducts(objective, x_flat, x_spec, y_flat, y_spec, central=self.central, h=self.h,
                                  scale=self.scale, distance=self.distance)

    def grad_y(self, objective: Objective, x: Tree, y: Tree) -> Tree:
        x_flat, x_spec = leaves(x)
        y_flat, y_spec = leaves(y)
        meta = (objective, x_spec, y_spec, len(x_flat), self.central, self.h, self.scale, self.distance)
        out = DifferencedGradient.apply(meta, *x_flat, *[t.detach() for t in y_flat])
        return unflatten(list(out[: len(y_flat)]), y_spec)


@dataclass(frozen=True)
class CentralDifference(_Difference):
    r"""Second-order products by central differences of first-order gradients.

    .. math:: \nabla^2_{\cdot y} g\, v \approx \frac{G(x, y + hv) - G(x, y - hv)}{2h},
              \qquad h = \frac{(3\varepsilon)^{1/3}(1 + \lVert y\rVert)}{\lVert v\rVert},

    with :math:`G` the gradient in :math:`y` (Hessian-vector products) or in :math:`x` (mixed products)
    and :math:`\varepsilon` the machine epsilon (of the autocast dtype under ``torch.autocast``).
    Truncation error :math:`O(h^2)`, rounding error :math:`O(\varepsilon/h)`; at the rule's step about
    :math:`\varepsilon^{2/3}` relative (:mod:`bilevel.differences` derives it). Two first-order gradient
    evaluations per product, no double backward.

    Composes with ``torch.func.grad``, ``vmap`` and ``jacrev`` of ``grad`` (whose second derivative is
    then the derivative of the difference quotient) and with ``torch.compile`` (the product runs
    eagerly behind a graph break; ``Exact()`` cannot, AOTAutograd compiles no double backward). Under
    plain autograd a double backward (``create_graph=True``) through the product raises. ``g`` is
    re-evaluated at the shifted points, so it must be deterministic; side effects (BatchNorm running
    statistics in train mode) happen again, in the backward pass for ``Linearized``. On ReLU networks
    the difference crosses kinks and can be far from the exact product (see the strategies page).

    Args:
        h: ``None`` for the rule above, or a fixed step (the point moves to :math:`y \pm h v`).
        scale: a factor on the rule's step (the rule's length :math:`1 + \lVert y\rVert` times
            ``scale``), for objectives whose curvature changes over a longer or shorter length.
        distance: a fixed distance :math:`t` the point moves, :math:`h = t / \lVert v\rVert` whatever
            :math:`y`: DARTS's :math:`\epsilon = 0.01 / \lVert v\rVert` is ``distance=0.01`` (Liu et al., 2019).
    """

    h: Optional[float] = None
    scale: float = 1.0
    distance: Optional[float] = None
    central = True


@dataclass(frozen=True)
class ForwardDifference(_Difference):
    r"""Second-order products by forward differences of first-order gradients.

    .. math:: \nabla^2_{\cdot y} g\, v \approx \frac{G(x, y + hv) - G(x, y)}{h},
              \qquad h = \frac{2\varepsilon^{1/2}(1 + \lVert y\rVert)}{\lVert v\rVert}.

    Truncation error :math:`O(h)`, rounding error :math:`O(\varepsilon/h)`; at the rule's step about
    :math:`\varepsilon^{1/2}` relative, so less accurate than :class:`CentralDifference` (about
    :math:`10^{-8}` against :math:`10^{-10}` in float64). One gradient evaluation per product plus the
    gradients at the point, computed once: ``Implicit`` computes them on its first product,
    ``Linearized`` in the pass that computes :math:`\nabla_y g(x, z)` for the value (reused, not
    recomputed). Same composition and requirements as :class:`CentralDifference`.

    Args:
        h: ``None`` for the rule above, or a fixed step (the point moves to :math:`y + h v`).
        scale: a factor on the rule's step.
        distance: a fixed distance the point moves, :math:`h = \text{distance} / \lVert v\rVert`.
    """

    h: Optional[float] = None
    scale: float = 1.0
    distance: Optional[float] = None
    central = False


def check_products(who: str, products: Any) -> None:
    """Raise ``TypeError`` unless ``products`` is a :class:`Products` instance."""
    if isinstance(products, Products):
        return
    hint = " (an instance: call it, e.g. CentralDifference())" if isinstance(products, type) else ""
    raise TypeError(f"{who}: products must be bilevel.Exact(), bilevel.CentralDifference(h=None) or "
                    f"bilevel.ForwardDifference(h=None){hint}, got {products!r}")
