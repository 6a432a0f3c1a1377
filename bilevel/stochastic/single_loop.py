r"""Shared parts of the single-loop methods (:class:`SOBA`, :class:`F2SA`, :class:`BOME`).

A single-loop method interleaves one update of the lower iterates (kept in a
:class:`StochasticState`) with one direction for the upper variable per call of ``step``::

    method = SOBA(lower, f, step_size=0.1, lower_batches=train, upper_batches=val)
    state = method.init(y0)
    for t in range(T):
        x.grad = method.step(x, state)   # updates state.y (and v, z, lam) in place
        x_optimizer.step()              # any torch.optim optimizer: the upper step size is its lr

The objectives are ``g(x, y, batch)`` (``lower.objective``) and ``f(x, y, batch)`` (``upper``); a batch
source left at ``None`` calls them without a batch. No host sync: step sizes are Python numbers and every
data-dependent quantity stays a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .._tree import Tree, leaves, unflatten
from ..problem import LowerProblem
from .batches import BatchSource, as_batches
from .parallel import DataParallel, mean_over
from .state import StochasticState

__all__ = ["SingleLoop", "StepSize", "partials", "requires_grad"]

StepSize = Union[float, Callable[[int], float]]


def partials(fn: Callable[..., torch.Tensor], xs: Sequence[torch.Tensor], x_spec: Any, ys: Sequence[torch.Tensor],
             y_spec: Any, batch: Tuple[Any, ...], *, create_graph: bool = False, wrt_x: bool = True, wrt_y: bool = True
             ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    r"""``fn(x, y, *batch)`` and its gradients in ``xs`` and ``ys`` (each list empty unless asked for), in one backward.

    Unused inputs get zero gradients. The differentiated inputs must require grad (or carry a graph to them).
    """
    wrt = [*(xs if wrt_x else ()), *(ys if wrt_y else ())]
    with torch.enable_grad():
        value = fn(unflatten(xs, x_spec), unflatten(ys, y_spec), *batch)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise ValueError("bilevel: the objectives must return a scalar tensor")
        grads = torch.autograd.grad(value, wrt, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    n_x = len(xs) if wrt_x else 0
    return value, grads[:n_x], grads[n_x:]


@dataclass(eq=False)
class SingleLoop:
    r"""Base of the single-loop methods.

    Args:
        lower: the lower problem; its objective is ``g(x, y, batch)`` and its constraint is enforced by
            projecting the lower iterates (its solver is not used).
        upper: the upper objective ``f(x, y, batch)``.
        step_size: the lower step size :math:`\rho`: a number, or a schedule ``t -> rho_t`` of the step count.
        lower_batches, upper_batches: batch sources for ``g`` and ``f`` (callables, iterables, ``DataLoader``);
            ``None`` calls the objective without a batch.
        mask_tol: a coordinate is free when it is more than ``mask_tol`` inside both bounds.
        parallel: a :class:`~bilevel.stochastic.DataParallel`: every batch estimate of a step is averaged over
            the ranks (each method's docstring counts the ``all_reduce`` calls per step).
    """

    lower: LowerProblem
    upper: Callable[..., torch.Tensor]
    step_size: StepSize = 0.1
    lower_batches: Optional[BatchSource] = None
    upper_batches: Optional[BatchSource] = None
    mask_tol: float = 0.0
    parallel: Optional[DataParallel] = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.lower, LowerProblem):
            raise TypeError(f"{name}: lower must be a bilevel.LowerProblem, got {type(self.lower).__name__}")
        if not callable(self.upper):
            raise TypeError(f"{name}: upper must be a callable f(x, y, batch), got {self.upper!r}")
        if not callable(self.step_size) and not self.step_size > 0:
            raise ValueError(f"{name}: step_size must be > 0 or a schedule t -> step size, got {self.step_size}")
        self.lower_batches = as_batches(self.lower_batches)
        self.upper_batches = as_batches(self.upper_batches)

    def init(self, y0: Tree) -> StochasticState:
        """A fresh state at the lower iterate ``y0`` (projected onto the constraint set)."""
        y0 = self.lower.project(y0)
        self.lower.check(y0)
        return StochasticState(y=y0)

    def step(self, x: Tree, state: StochasticState) -> Tree:  # pragma: no cover - interface
        """Update ``state`` in place and return the upper direction (a tree like ``x``)."""
        raise NotImplementedError

    # helpers shared by the methods
    def rate(self, step_size: StepSize, t: int) -> float:
        """The step size at step count ``t`` (a number, or a schedule evaluated at ``t``, which must give a finite number > 0)."""
        if not callable(step_size):
            return step_size
        value = step_size(t)
        if isinstance(value, torch.Tensor):  # read without a sync only when it is already on the host
            number = float(value) if value.device.type == "cpu" and value.numel() == 1 else None
        else:
            number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: the step-size schedule returned {value!r} at step {t}; expected a number")
        if number is not None and not (math.isfinite(number) and number > 0):
            raise ValueError(f"{type(self).__name__}: the step-size schedule returned {number!r} at step {t}; step sizes "
                             "must be finite and > 0")
        return value

    def average(self, *groups: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
        """Each group of estimates averaged over the ranks with ``parallel`` (one ``all_reduce`` for all of them)."""
        if self.parallel is None:
            return [list(g) for g in groups]
        flat = mean_over(self.parallel, [t for g in groups for t in g])
        out, start = [], 0
        for g in groups:
            out.append(flat[start:start + len(g)])
            start += len(g)
        return out

    def draw(self) -> Tuple[Tuple[Any, ...], Tuple[Any, ...]]:
        """Fresh, independent batch arguments for ``g`` and for ``f`` (empty tuples without a source)."""
        lb, ub = self.lower_batches, self.upper_batches
        return (() if lb is None else (lb(),)), (() if ub is None else (ub(),))

    def project(self, ys: List[torch.Tensor], spec: Any) -> List[torch.Tensor]:
        r""":math:`\mathrm{Proj}_C` of the lower iterate's leaves (the same list when unconstrained)."""
        if self.lower.constraint is None:
            return ys
        return leaves(self.lower.project(unflatten(ys, spec)))[0]

    def free_mask(self, ys: List[torch.Tensor], spec: Any) -> Optional[List[torch.Tensor]]:
        """Per-leaf 0/1 masks of the free coordinates (in the leaves' dtype), or ``None`` when unconstrained."""
        masks = self.lower.free_mask(ys, self.mask_tol, spec)
        return None if masks is None else [m.to(t.dtype) for m, t in zip(masks, ys)]


def requires_grad(flat: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Detached copies that require grad (the inputs of one step's derivatives)."""
    return [t.detach().requires_grad_() for t in flat]
