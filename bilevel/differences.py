r"""Second-order products of :math:`g` by differences of first-order gradients.

A Hessian-vector or mixed product is the directional derivative of a gradient,

.. math::

    \nabla^2_{yy} g\, v = \tfrac{\mathrm{d}}{\mathrm{d}t} \nabla_y g(x, y + t v)\big|_{t=0},
    \qquad
    \nabla^2_{xy} g\, u = \tfrac{\mathrm{d}}{\mathrm{d}t} \nabla_x g(x, y + t u)\big|_{t=0},

so with :math:`G` either gradient it is taken as

.. math::

    \text{central: } \frac{G(y + h v) - G(y - h v)}{2h} \quad (\text{error } O(h^2)), \qquad
    \text{forward: } \frac{G(y + h v) - G(y)}{h} \quad (\text{error } O(h)),

with one or two first-order gradient evaluations per product and no double backward.

**The step rule.** Write the step along the unit direction :math:`d = v/\lVert v\rVert` as
:math:`t = h\lVert v\rVert`. A computed gradient carries an absolute rounding error of about
:math:`\varepsilon\, S` (:math:`\varepsilon` the machine epsilon, :math:`S` the size of the gradient),
and :math:`y + t d` is itself rounded at :math:`\varepsilon\lVert y\rVert`. With :math:`L` the length over
which the curvature changes, the truncation error relative to :math:`S` is about
:math:`t^2/(6L^2)` (central) or :math:`t/(2L)` (forward) and the rounding error about
:math:`\varepsilon L / t`. Minimizing the sum gives :math:`t^\star \approx (3\varepsilon)^{1/3} L`
(central, relative error :math:`\approx \varepsilon^{2/3}`) and :math:`t^\star \approx 2\sqrt{\varepsilon}\, L`
(forward, relative error :math:`\approx \sqrt{\varepsilon}`). Without second and third derivatives at
hand, the rule takes the scale of the point, :math:`L = 1 + \lVert y\rVert`:

.. math::

    h = \frac{(3\varepsilon)^{1/3} (1 + \lVert y\rVert)}{\lVert v\rVert} \ \ (\text{central}), \qquad
    h = \frac{2\varepsilon^{1/2} (1 + \lVert y\rVert)}{\lVert v\rVert} \ \ (\text{forward}),

where :math:`\varepsilon` is the machine epsilon of :math:`y`'s dtype, or of the autocast dtype when
``torch.autocast`` is on for :math:`y`'s device and is coarser. In float64 this predicts relative
errors near :math:`4 \cdot 10^{-11}` (central) and :math:`1.5 \cdot 10^{-8}` (forward); in float32,
:math:`2 \cdot 10^{-5}` and :math:`3 \cdot 10^{-4}`, times the problem's conditioning. The step is a
tensor computed from tensor norms (no host synchronization) and a constant of differentiation
(detached). A zero direction gives a zero product.

**Requirements on g.** ``g`` is evaluated again at the shifted points, so it must be deterministic
(no dropout) and it should be free of side effects (BatchNorm in train mode updates its running
statistics on every evaluation). A non-smooth ``g`` (ReLU networks) is differenced across its kinks:
the error then has an extra term of the order of the fraction of kinks crossed.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from ._autodiff import Objective, SecondOrderProducts, gradients
from ._tree import is_functorch_mode, to_vector

__all__ = ["DifferenceProducts", "DifferencedGradient", "machine_epsilon", "rule_step"]


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError):  # pragma: no cover - torch 2.3
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def machine_epsilon(t: torch.Tensor) -> float:
    """Machine epsilon of ``t``'s dtype, or of the autocast dtype on ``t``'s device if that is coarser."""
    eps = torch.finfo(t.dtype).eps
    cast = _autocast_dtype(t.device.type)
    return max(eps, torch.finfo(cast).eps) if cast is not None else eps


def rule_step(y_flat: Sequence[torch.Tensor], central: bool) -> torch.Tensor:
    r""":math:`t = \varepsilon^{1/3}(1 + \lVert y\rVert)` (central) or :math:`\varepsilon^{1/2}(1 + \lVert y\rVert)`
    (forward): the rule's step along a unit direction, a detached 0-dim tensor (see the module docstring)."""
    eps = machine_epsilon(y_flat[0])
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach()) for t in y_flat]))
    return (1.0 + norm) * ((3.0 * eps) ** (1.0 / 3.0) if central else 2.0 * eps ** 0.5)


class DifferenceProducts(SecondOrderProducts):
    r"""The second-order products of :math:`g` at :math:`(x, y)` by central or forward differences.

    Same interface as :class:`bilevel._autodiff.ExactProducts`. Cost per product, in first-order
    gradient evaluations of :math:`g` (one forward and one backward pass each): :meth:`hvp` and
    :meth:`cross` 2 (central) or 1 (forward), plus, for forward differences, the gradients at the
    point itself, computed once (both :math:`\nabla_x g` and :math:`\nabla_y g` in one pass) unless the
    caller passes them (``base_x``, ``base_y``). :meth:`hvp` differentiates in :math:`y` only, so its
    passes skip the weight gradients; :meth:`cross` skips the input gradient.

    Args:
        objective: :math:`g(x, y)`.
        x_flat, x_spec, y_flat, y_spec: the point, as leaves and tree specs.
        central: central (``True``) or forward differences.
        h: ``None`` for the step rule, or a fixed step: the point moves to :math:`y \pm h v`.
        scale: a factor on the rule's step (ignored when ``h`` is given).
        distance: a fixed distance the point moves along the unit direction, instead of the rule's.
        base_x, base_y: :math:`\nabla_x g` and :math:`\nabla_y g` at the point, if already computed.
    """

    def __init__(self, objective: Objective, x_flat: Sequence[torch.Tensor], x_spec: Any,
                 y_flat: Sequence[torch.Tensor], y_spec: Any, *, central: bool, h: Optional[float] = None,
                 scale: float = 1.0, base_x: Optional[List[torch.Tensor]] = None,
                 base_y: Optional[List[torch.Tensor]] = None, distance: Optional[float] = None) -> None:
        self.objective, self.x_spec, self.y_spec = objective, x_spec, y_spec
        self.x_like, self.y_like = list(x_flat), list(y_flat)
        self.central, self.h, self.scale, self.distance = central, h, scale, distance
        self.base_x, self.base_y = base_x, base_y
        self._t: Optional[torch.Tensor] = None

    def _grads_at(self, shift: Sequence[torch.Tensor], wrt_x: bool, wrt_y: bool):
        y = [t + s for t, s in zip(self.y_like, shift)]
        return gradients(self.objective, self.x_like, self.x_spec, y, self.y_spec, wrt_x=wrt_x, wrt_y=wrt_y)

    def _base(self, want_x: bool) -> List[torch.Tensor]:
        if (self.base_x if want_x else self.base_y) is None:
            # both in one pass: the other is needed by the next product of the other kind
            gx, gy = gradients(self.objective, self.x_like, self.x_spec, self.y_like, self.y_spec,
                               wrt_x=True, wrt_y=True)
            self.base_x = self.base_x if self.base_x is not None else gx
            self.base_y = self.base_y if self.base_y is not None else gy
        return self.base_x if want_x else self.base_y

    def step(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | float]:
        """``(direction, factor)``: the point moves by ``± direction`` and the product is the gradient
        difference times ``factor`` (``h v`` and ``1/(2h)`` or ``1/h``; ``h`` from the rule or fixed)."""
        v = v.to(self.y_like[0].dtype)
        if self.h is not None:
            return self.h * v, 1.0 / ((2.0 if self.central else 1.0) * self.h)
        if self._t is None:
            self._t = (rule_step(self.y_like, self.central) * self.scale if self.distance is None
                       else torch.tensor(float(self.distance), dtype=v.dtype, device=v.device))
        norm = torch.linalg.vector_norm(v.detach()).clamp_min(torch.finfo(v.dtype).tiny)
        # moving by t * v / |v| (not h * v with h = t / |v|) cannot overflow, and v = 0 gives 0
        return v * (self._t / norm), norm / ((2.0 if self.central else 1.0) * self._t)

    def _difference(self, v: torch.Tensor, wrt_x: bool) -> List[torch.Tensor]:
        direction, factor = self.step(v)
        shift = self._split_y(direction)
        plus = self._grads_at(shift, wrt_x, not wrt_x)[0 if wrt_x else 1]
        if self.central:
            minus = self._grads_at([-s for s in shift], wrt_x, not wrt_x)[0 if wrt_x else 1]
        else:
            minus = self._base(wrt_x)
        return [(p - m) * factor for p, m in zip(plus, minus)]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla^2_{yy} g\, v` for a flat vector ``v``: differences of :math:`\nabla_y g`."""
        return to_vector(self._difference(v, wrt_x=False))

    def hvp_batched(self, V: torch.Tensor) -> torch.Tensor:
        r"""Rows of :math:`V \nabla^2_{yy} g` for ``V`` of shape (k, n): one :meth:`hvp` per row (not symmetrized)."""
        return torch.stack([self.hvp(v) for v in V.unbind(0)])

    def cross(self, u: torch.Tensor) -> List[torch.Tensor]:
        r""":math:`\nabla^2_{xy} g\, u` per leaf of ``x``: differences of :math:`\nabla_x g` along ``u``."""
        return self._difference(u, wrt_x=True)


class DifferencedGradient(torch.autograd.Function):
    r""":math:`\nabla_y g(x, y)` in the forward pass; in the backward pass its vector-Jacobian product in
    :math:`x`, :math:`w \mapsto \nabla^2_{xy} g\, w`, by differences (no double backward). ``y`` is a
    constant (its cotangent is ``None``).

    Call as ``DifferencedGradient.apply((objective, x_spec, y_spec, n_x, central, h, scale, distance), *x_flat, *y_flat)``; it
    returns the leaves of :math:`\nabla_y g`, followed, for forward differences, by those of
    :math:`\nabla_x g` at the point (non-differentiable outputs: the forward pass computes them in the
    same backward pass, and the backward pass reuses them as the base of its difference; under
    ``torch.func`` transforms the backward pass recomputes them, so that it stays differentiable).
    The backward pass evaluates :math:`g` under the autocast state of the forward pass.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(meta: Tuple, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        objective, x_spec, y_spec, n_x, central = meta[:5]
        x_flat, y_flat = list(tensors[:n_x]), list(tensors[n_x:])
        gx, gy = gradients(objective, x_flat, x_spec, y_flat, y_spec, wrt_x=not central, wrt_y=True)
        return (*gy, *(gx or []))

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple, output: Tuple[torch.Tensor, ...]) -> None:
        meta = inputs[0]
        n_x = meta[3]
        n_y = len(inputs) - 1 - n_x
        base_x = output[n_y:]
        ctx.meta, ctx.n_y = meta, n_y
        # the backward pass evaluates g under the forward pass's autocast state (a forward difference
        # must not subtract a bf16 gradient from a float32 one)
        device_type = inputs[1 + n_x].device.type if n_y else "cpu"
        ctx.autocast = (device_type, _autocast_dtype(device_type))
        if base_x:
            ctx.mark_non_differentiable(*base_x)
        ctx.save_for_backward(*inputs[1:], *base_x)

    @staticmethod
    def backward(ctx: Any, *cotangents: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        objective, x_spec, y_spec, n_x, central, h, scale, distance = ctx.meta
        n_y = ctx.n_y
        saved = ctx.saved_tensors
        x_flat, y_flat = list(saved[:n_x]), list(saved[n_x:n_x + n_y])
        base_x = list(saved[n_x + n_y:]) or None
        w = [torch.zeros_like(y) if c is None else c for c, y in zip(cotangents[:n_y], y_flat)]
        functorch = is_functorch_mode(list(saved) + w)
        if functorch:
            # an outer transform may differentiate this backward (jacrev of grad): the saved base is a
            # non-differentiable output, so take the gradient at the point again, differentiably
            base_x = None
        elif torch.is_grad_enabled():
            raise RuntimeError(
                "bilevel: double backward (create_graph=True) through a finite-difference product is not supported "
                "under plain autograd; use torch.func (e.g. torch.func.jacrev(torch.func.grad(F))) or products=Exact()"
            )
        products = DifferenceProducts(objective, x_flat, x_spec, y_flat, y_spec, central=central, h=h, scale=scale,
                                      base_x=base_x, distance=distance)
        device_type, cast = ctx.autocast
        with torch.autocast(device_type, dtype=cast, enabled=cast is not None):
            cross = products.cross(to_vector(w))
        return (None, *cross, *([None] * n_y))
