r"""Constraint sets for the lower problem: boxes, L-inf balls and their intersections.

Every set here is a box :math:`C = \{y : l \le y \le u\}` with elementwise bounds ``l, u`` (floats or
tensors broadcastable to ``y``; per-sample bounds are tensors of the batch's shape). Boxes are closed
under intersection, so :math:`C_1 \cap C_2` is again a box with bounds :math:`\max(l_1, l_2)` and
:math:`\min(u_1, u_2)`, and its Euclidean projection is exact: :math:`\mathrm{Proj}_C(y) = \min(\max(y, l), u)`.

The implicit hypergradient needs the *free set*: coordinates strictly inside the bounds. Its 0/1 mask
:math:`D` is the Jacobian of the projection away from ties (:math:`\partial \mathrm{Proj}_C / \partial y = \mathrm{diag}(D)`),
so differentiating the fixed point :math:`y^\star = \mathrm{Proj}_C(y^\star - \eta \nabla_y g)` gives the masked system
:math:`(D H D + (I - D))\,u = D v` of :class:`bilevel.Implicit`.

Bounds are treated as constants with respect to the upper variable ``x`` by every strategy (they are
detached), and tensor bounds are cast to the variable's dtype (a float32 bound ``0.3`` becomes
``0.30000001`` in a float64 problem: build bounds in the problem's dtype).
"""

from __future__ import annotations

from typing import Union

import torch

from ._tree import is_batched

Bound = Union[float, torch.Tensor]

__all__ = ["Constraint", "Box", "LInfBall", "Intersection"]


def _as_bound(b: Bound, like: torch.Tensor) -> Bound:
    # bounds are constants for every strategy (no gradient flows into them), cast to the variable's dtype
    if isinstance(b, torch.Tensor):
        return b.detach().to(dtype=like.dtype, device=like.device)
    return float(b)


def _readable(*bounds: Bound) -> bool:
    """Whether the bounds' values can be read: no tensor batched by ``vmap`` (a per-sample bound)."""
    return not any(is_batched(b) for b in bounds if isinstance(b, torch.Tensor))


def _shape(b: Bound) -> torch.Size:
    return b.shape if isinstance(b, torch.Tensor) else torch.Size([])


def _maximum(a: Bound, b: Bound) -> Bound:
    # torch.clamp with a Python-number bound: no host-to-device copy (torch.as_tensor(float, device=cuda) syncs)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.maximum(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        t, c = (a, b) if isinstance(a, torch.Tensor) else (b, a)
        return torch.clamp(t, min=float(c))
    return max(float(a), float(b))


def _minimum(a: Bound, b: Bound) -> Bound:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.minimum(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        t, c = (a, b) if isinstance(a, torch.Tensor) else (b, a)
        return torch.clamp(t, max=float(c))
    return min(float(a), float(b))


class Constraint:
    """A closed convex set with an exact projection and a free-coordinate mask."""

    def project(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Euclidean projection of ``y`` onto the set (differentiable by autograd)."""
        raise NotImplementedError

    def free_mask(self, y: torch.Tensor, tol: float = 0.0) -> torch.Tensor:  # pragma: no cover
        """Boolean mask of coordinates of ``y`` strictly inside the set's bounds (by more than ``tol``)."""
        raise NotImplementedError

    def check_shape(self, y: torch.Tensor) -> None:  # pragma: no cover
        """Raise ``ValueError`` if the set's bounds cannot broadcast to ``y``'s shape."""
        raise NotImplementedError

    def __and__(self, other: Constraint) -> Constraint:
        check = getattr(self, "_check", True) and getattr(other, "_check", True)
        return Intersection(self, other, check=check)


class Box(Constraint):
    r"""The box :math:`\{y : l \le y \le u\}`.

    Args:
        lower, upper: bounds, floats or tensors broadcastable to ``y`` (``-inf``/``inf`` allowed).
        check: verify ``lower <= upper`` at construction. With tensor bounds this is one host
            synchronization; pass ``check=False`` in per-batch code on a GPU. Skipped for bounds batched by
            ``vmap`` (per-sample bounds), whose values cannot be read there.
    """

    def __init__(self, lower: Bound, upper: Bound, *, check: bool = True) -> None:
        self.lower = lower
        self.upper = upper
        self._check = check
        if check and _readable(lower, upper):
            self._check_nonempty()

    def _check_nonempty(self) -> None:
        lo, hi = torch.as_tensor(self.lower), torch.as_tensor(self.upper)
        if bool(torch.isnan(lo).any()) or bool(torch.isnan(hi).any()):
            raise ValueError(f"{type(self).__name__}: bounds contain NaN")
        bad = lo > hi
        if bool(bad.any()):
            raise ValueError(
                f"{type(self).__name__}: lower > upper at {int(bad.sum())} coordinate(s); the set is empty"
            )

    def project(self, y: torch.Tensor) -> torch.Tensor:
        lo, hi = _as_bound(self.lower, y), _as_bound(self.upper, y)
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            lo_t = lo if isinstance(lo, torch.Tensor) else torch.full((), lo, dtype=y.dtype, device=y.device)
            hi_t = hi if isinstance(hi, torch.Tensor) else torch.full((), hi, dtype=y.dtype, device=y.device)
            return torch.clamp(y, min=lo_t, max=hi_t)
        return torch.clamp(y, min=lo, max=hi)

    def free_mask(self, y: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
        lo, hi = _as_bound(self.lower, y), _as_bound(self.upper, y)
        return (y > lo + tol) & (y < hi - tol)

    def check_shape(self, y: torch.Tensor) -> None:
        for name, b in (("lower", self.lower), ("upper", self.upper)):
            try:
                out = torch.broadcast_shapes(_shape(b), y.shape)
            except RuntimeError:
                out = None
            if out != y.shape:
                raise ValueError(
                    f"{type(self).__name__}: {name} bound of shape {tuple(_shape(b))} does not broadcast to the "
                    f"variable's shape {tuple(y.shape)}"
                )

    def __repr__(self) -> str:
        def show(b: Bound) -> str:
            return f"Tensor{tuple(b.shape)}" if isinstance(b, torch.Tensor) else repr(b)

        return f"{type(self).__name__}(lower={show(self.lower)}, upper={show(self.upper)})"


class LInfBall(Box):
    r"""The L-inf ball :math:`\{y : \|y - c\|_\infty \le r\}` = the box :math:`[c - r, c + r]`.

    Args:
        center: float or tensor broadcastable to ``y``.
        radius: non-negative float or tensor (per-sample radii broadcast like ``center``).
    """

    def __init__(self, center: Bound, radius: Bound, *, check: bool = True) -> None:
        if check and _readable(radius):  # a per-sample center under vmap leaves a float radius checkable
            r = torch.as_tensor(radius)
            if bool((r < 0).any()) or bool(torch.isnan(r).any()):
                raise ValueError(f"LInfBall: radius must be >= 0, got {radius}")
        self.center, self.radius = center, radius
        super().__init__(center - radius, center + radius, check=False)
        self._check = check

    def __repr__(self) -> str:
        return f"LInfBall(center={self.center if not isinstance(self.center, torch.Tensor) else 'Tensor'}, " \
               f"radius={self.radius if not isinstance(self.radius, torch.Tensor) else 'Tensor'})"


class Intersection(Box):
    r"""The intersection of boxes: a box with bounds :math:`\max_i l_i` and :math:`\min_i u_i`.

    The adversarial set :math:`\{\|\delta\|_\infty \le \epsilon\} \cap \{0 \le x + \delta \le 1\}` is
    ``LInfBall(0, eps) & Box(-x, 1 - x)``. The projection onto it is exact (clamp to the combined bounds).
    """

    def __init__(self, *sets: Constraint, check: bool = True) -> None:
        if not sets:
            raise ValueError("Intersection: needs at least one set")
        parts = []
        for s in sets:
            if not isinstance(s, Box):
                raise TypeError(f"Intersection: only box-like sets are supported, got {type(s).__name__}")
            parts.extend(s.parts if isinstance(s, Intersection) else [s])
        self.parts = tuple(parts)
        lo, hi = parts[0].lower, parts[0].upper
        for s in parts[1:]:
            lo, hi = _maximum(lo, s.lower), _minimum(hi, s.upper)
        super().__init__(lo, hi, check=check)

    def __repr__(self) -> str:
        return " & ".join(repr(p) for p in self.parts)
