r"""Linearized hypergradient: the lower problem replaced by its proximal linearization (Fast-BAT's IG)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .._autodiff import detach_tree
from .._tree import Tree, leaves, tree_map, unflatten
from ..problem import LowerProblem
from ..products import Exact, Products, check_products
from .base import Strategy

__all__ = ["Linearized"]


@dataclass(frozen=True)
class Linearized(Strategy):
    r"""Solve the proximal linearization of the lower problem at :math:`z` in closed form.

    With :math:`z` = ``init`` (treated as a constant),

    .. math::

        y^\star(x) = \arg\min_{y \in C}\ \langle \nabla_y g(x, z), y - z\rangle + \tfrac{\lambda}{2}\|y - z\|^2
                   = \mathrm{Proj}_C\big(z - \tfrac{1}{\lambda} \nabla_y g(x, z)\big),

    and for a box :math:`C` with free-coordinate mask :math:`H_C` its derivative is

    .. math:: \frac{\mathrm{d} y^\star}{\mathrm{d} x} = -\tfrac{1}{\lambda}\, H_C\, \nabla^2_{yx} g(x, z).

    Autograd through the closed form (``create_graph`` on :math:`\nabla_y g`, the clamp providing
    :math:`H_C`) computes this exactly; it is the implicit gradient of Fast-BAT (Zhang et al., 2022).
    With ``products=CentralDifference()`` or ``ForwardDifference()`` the mixed product
    :math:`\tfrac{\mathrm{d}}{\mathrm{d}x}\langle \nabla_y g(x, z), w\rangle` of the backward pass is
    taken by differences of :math:`\nabla_x g` at :math:`z \pm h w` instead of a double backward.

    Args:
        step: the step of the value, :math:`y^\star = \mathrm{Proj}_C(z - \text{step}\cdot\nabla_y g)`.
        lam: :math:`\lambda` of the derivative. ``None`` (default) means ``1 / step``: the exact
            derivative of the closed form. A different value decouples the two, as the official
            Fast-BAT code does (step 5000/255 with :math:`\lambda = 10`): the value uses ``step`` and the
            derivative uses :math:`1/\lambda`. ``math.inf`` drops the implicit term (first order), and then
            no second-order graph is built.
        sign: use :math:`\mathrm{sign}\,\nabla_y g` as the linear term (Fast-AT's FGSM step). The sign has
            zero derivative, so the hypergradient is the first-order one.
        mask_tol: ``None`` (default): :math:`H_C` is the clamp's own derivative, which counts a coordinate
            lying exactly on a bound as free. A float ``t``: only coordinates more than ``t`` inside both
            bounds are free (the official Fast-BAT code uses a strict interior with ``t = 1e-7``).
        products: how the mixed product is taken: :class:`~bilevel.Exact` (default: the forward pass
            keeps the graph of :math:`\nabla_y g`, the backward pass is a double backward),
            :class:`~bilevel.CentralDifference` (forward pass: :math:`\nabla_y g` without a graph;
            backward pass: :math:`\nabla_x g` at :math:`z + hw` and :math:`z - hw`) or
            :class:`~bilevel.ForwardDifference` (forward pass: :math:`\nabla_y g` and
            :math:`\nabla_x g` at :math:`z` in one pass; backward pass: :math:`\nabla_x g` at :math:`z + hw`).
    """

    step: float
    lam: Optional[float] = None
    sign: bool = False
    mask_tol: Optional[float] = None
    products: Products = field(default_factory=Exact)

    def __post_init__(self) -> None:
        if not self.step > 0:
            raise ValueError(f"Linearized: step must be > 0, got {self.step}")
        if self.lam is not None and not self.lam > 0:
            raise ValueError(f"Linearized: lam must be > 0 (math.inf drops the implicit term), got {self.lam}")
        if self.mask_tol is not None and not self.mask_tol >= 0:
            raise ValueError(f"Linearized: mask_tol must be None or >= 0, got {self.mask_tol}")
        check_products("Linearized", self.products)

    @property
    def ig_scale(self) -> float:
        r"""The factor :math:`1/\lambda` of the implicit term (0 when it is dropped; ``step`` when ``lam`` is None)."""
        if self.sign:
            return 0.0
        return self.step if self.lam is None else (0.0 if math.isinf(self.lam) else 1.0 / self.lam)

    def _unreached_note(self) -> Optional[Tuple[str, str]]:
        return None if self.ig_scale == 0.0 else ("", "")  # lam=inf and sign=True are first order by design

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
        scale = self.ig_scale
        differentiable = scale != 0.0 and torch.is_grad_enabled()
        z = detach_tree(init)
        if differentiable:
            grad = self.products.grad_y(lower.objective, x, z)
        else:
            _, grad = lower.value_and_grad(x, z)
        step = self.step
        if self.sign:
            u = tree_map(lambda t, d: t - step * d.sign(), z, grad)
        elif not differentiable or scale == step:  # without a graph the gradient is already detached
            u = tree_map(lambda t, d: t - step * d, z, grad)
        else:
            # value z - step * d, derivative -scale * dd
            u = tree_map(lambda t, d: t - (step - scale) * d.detach() - scale * d, z, grad)
        y = lower.project(u)
        if differentiable and self.mask_tol is not None and lower.constraint is not None:
            # same value; the derivative kept only on coordinates more than mask_tol inside the bounds
            y_flat, spec = leaves(y)
            masks = lower.free_mask([t.detach() for t in y_flat], self.mask_tol, spec)
            y = unflatten([torch.where(m, t, t.detach()) for m, t in zip(masks, y_flat)], spec)
        return y
