r"""Lower-level solvers: iterate towards :math:`y^\star(x) \in \arg\min_{y \in C} g(x, y)`.

Each solver runs a fixed number of steps with no host synchronization, so it can run on a GPU
without stalls. ``run(lower, x, init, differentiable_steps=T)`` performs the first ``steps - T`` steps
without a graph and the last ``T`` with one (``create_graph=True``), which is what
:class:`bilevel.Unrolled` (full or truncated) backpropagates through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Tuple

import torch

from ._autodiff import detach_tree
from ._tree import Tree, leaves, tree_map, unflatten
from .problem import LowerProblem

__all__ = ["Solver", "GradientDescent", "ProjectedGradient", "SignedProjectedGradient", "ClosedForm", "check_steps",
           "with_weight_decay", "batch_gradient"]


class Solver:
    """Interface of a lower-level solver: ``steps`` iterations of :meth:`step` (``steps >= 1``, required)."""

    steps: int

    def step(self, lower: LowerProblem, x: Tree, y: Tree, *, create_graph: bool) -> Tree:  # pragma: no cover
        """One iteration :math:`y \\mapsto y^+`."""
        raise NotImplementedError

    def update(self, lower: LowerProblem, x: Tree, y: Tree, state: Any, k: int, *, create_graph: bool
               ) -> Tuple[Tree, Any]:
        """Iteration ``k`` with the state the solver carries between iterations (momentum, moments; ``None``
        before the first): ``(y+, state+)``. Stateless solvers take :meth:`step`."""
        return self.step(lower, x, y, create_graph=create_graph), state

    def run(self, lower: LowerProblem, x: Tree, init: Tree, *, differentiable_steps: int = 0) -> Tree:
        """Run ``self.steps`` iterations from ``init``; the last ``differentiable_steps`` keep a graph."""
        n_plain = max(self.steps - differentiable_steps, 0)
        # a full unroll differentiates through init too (MAML: init = theta); a truncated one starts from a constant
        y, state = (init if n_plain == 0 else detach_tree(init)), None
        x_plain = detach_tree(x)
        for k in range(self.steps):
            graph = k >= n_plain
            y, state = self.update(lower, x if graph else x_plain, y, state, k, create_graph=graph)
        return y

    def minimized(self, lower: LowerProblem) -> LowerProblem:
        """The problem whose solutions this solver converges to: ``lower`` itself, or ``lower`` plus the L2
        term of a weight decay the solver adds to the gradient. :class:`~bilevel.Implicit` differentiates it."""
        return lower


def batch_gradient(lower: LowerProblem, x: Tree, y: Tree, draw: Optional[Callable[[], Any]], parallel: Any,
                   weight_decay: float, create_graph: bool) -> Tree:
    r""":math:`\nabla_y g(x, y; B) + \omega y` on the next batch of ``draw`` (the full ``g`` without), averaged over
    the ranks of ``parallel`` (inside the graph when ``create_graph``): the direction of :class:`~bilevel.SGD`
    and :class:`~bilevel.Adam`."""
    problem = lower if draw is None else lower.on(draw())
    _, grad = problem.value_and_grad(x, y, create_graph=create_graph)
    if parallel is not None:
        flat, spec = leaves(grad)
        grad = unflatten(parallel.mean(flat, differentiable=create_graph), spec)
    if weight_decay:
        grad = tree_map(lambda d, t: d + weight_decay * t, grad, y)
    return grad


def with_weight_decay(lower: LowerProblem, weight_decay: float) -> LowerProblem:
    r"""``lower`` with :math:`\tfrac{\omega}{2}\lVert y\rVert^2` added to its objective (``weight_decay`` :math:`\omega`).

    A solver that adds :math:`\omega y` to every gradient (``torch.optim.SGD`` and ``Adam``'s ``weight_decay``)
    converges to the stationary points of this objective, not of :math:`g`."""
    if not weight_decay:
        return lower
    objective = lower.objective

    def decayed(x: Tree, y: Tree, *batch: Any) -> torch.Tensor:
        return objective(x, y, *batch) + 0.5 * weight_decay * sum((t * t).sum() for t in leaves(y)[0])

    return replace(lower, objective=decayed)


def check_steps(name: str, steps: int, step_size: Optional[float] = None) -> None:
    """Raise ``ValueError`` unless ``steps`` is an integer >= 1 and ``step_size`` (if given) is a finite number > 0.

    A solver of zero steps would return its starting point unchanged: :func:`bilevel.solve` would then
    silently answer with ``init``, and :class:`bilevel.Unrolled` with a result that has no graph.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or int(steps) != steps or steps < 1:
        raise ValueError(f"{name}: steps must be an integer >= 1 (the number of solver iterations), got {steps!r}")
    if step_size is not None and not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"{name}: step_size must be a finite number > 0, got {step_size!r}")


@dataclass(frozen=True)
class GradientDescent(Solver):
    r"""Gradient descent :math:`y \leftarrow y - \eta \nabla_y g(x, y)` for an unconstrained lower problem."""

    step_size: float
    steps: int

    def __post_init__(self) -> None:
        check_steps(type(self).__name__, self.steps, self.step_size)

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def step(self, lower: LowerProblem, x: Tree, y: Tree, *, create_graph: bool) -> Tree:
        if type(self) is GradientDescent and lower.constraint is not None:
            raise ValueError("GradientDescent: the lower problem has a constraint; use ProjectedGradient")
        _, grad = lower.value_and_grad(x, y, create_graph=create_graph)
        y_new = tree_map(lambda t, d: t - self.step_size * self._direction(d), y, grad)
        return lower.project(y_new)


@dataclass(frozen=True)
class ProjectedGradient(GradientDescent):
    r"""Projected gradient :math:`y \leftarrow \mathrm{Proj}_C(y - \eta \nabla_y g(x, y))`."""


@dataclass(frozen=True)
class SignedProjectedGradient(GradientDescent):
    r"""Signed projected gradient :math:`y \leftarrow \mathrm{Proj}_C(y - \eta\, \mathrm{sign}\, \nabla_y g(x, y))`.

    The L-inf steepest-descent step of PGD and FGSM attacks (with ``g = -loss``).
    """

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()


@dataclass(frozen=True)
class ClosedForm(Solver):
    r"""A user function ``fn(x) -> y*`` that solves the lower problem exactly (``init`` is ignored).

    Under :class:`bilevel.Unrolled` autograd differentiates ``fn`` itself; under
    :class:`bilevel.Implicit` only its output is used, at which the optimality conditions are linearized.
    """

    fn: Callable[[Tree], Tree]
    steps: int = 1

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"ClosedForm: fn must be a function x -> y*, got {type(self.fn).__name__}")
        check_steps("ClosedForm", self.steps)

    def step(self, lower: LowerProblem, x: Tree, y: Tree, *, create_graph: bool) -> Tree:
        if create_graph:
            return self.fn(x)
        with torch.no_grad():
            return detach_tree(self.fn(detach_tree(x)))
