r"""Implicit hypergradient: the implicit function theorem on Hessian-vector products."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

from .._tree import Tree, is_functorch_mode, leaves, leaves_like, to_vector, unflatten
from ..linalg import CG, LinearSolveInfo, LinearSolver
from ..problem import LowerProblem
from ..products import Exact, Products, check_products
from .base import Strategy

__all__ = ["Implicit", "implicit_solution"]


@dataclass(eq=False)
class Implicit(Strategy):
    r"""Implicit differentiation of the lower optimality conditions.

    Unconstrained, :math:`\nabla_y g(x, y^\star) = 0` gives
    :math:`\mathrm{d}y^\star/\mathrm{d}x = -H^{-1} \nabla^2_{yx} g` with :math:`H = \nabla^2_{yy} g(x, y^\star)`.
    With a box constraint, the fixed point :math:`y^\star = \mathrm{Proj}_C(y^\star - \eta\nabla_y g)` is
    differentiated instead: with :math:`D` the diagonal 0/1 mask of free coordinates at :math:`y^\star`,
    the backward pass solves the symmetric positive-definite system (for convex :math:`g`)

    .. math:: \big(D H D + (I - D) + \rho I\big)\, u = D\, v, \qquad v = \partial f / \partial y^\star,

    so that :math:`u` vanishes on active coordinates and :math:`u_F = H_{FF}^{-1} v_F`, and returns
    :math:`\bar x = -\nabla^2_{xy} g\, u`. This is the exact active-set hypergradient: active
    coordinates do not move with :math:`x` (bounds are constants), free ones follow the reduced system.

    The forward pass runs ``lower.solver`` without a graph. The backward pass calls ``linear_solver``
    on Hessian-vector products at :math:`(x, y^\star)`, taken as ``products`` says: by default by
    double backward through :math:`\nabla_y g` built once (``torch.func.vjp`` under function
    transforms), or by differences of first-order gradients. Under plain autograd the
    hypergradient is differentiable once (``create_graph=True`` through it raises); under ``torch.func``
    the backward is itself differentiable, so ``torch.func.jacrev(torch.func.grad(F))`` works.

    Args:
        linear_solver: :class:`~bilevel.CG` (default), :class:`~bilevel.Neumann` or :class:`~bilevel.DenseSolve`.
        damping: :math:`\rho \ge 0`, added to the system (Tikhonov damping for ill-conditioned or
            non-convex lower problems).
        mask_tol: a coordinate is free when it is more than ``mask_tol`` inside both bounds.
        products: how the Hessian-vector and mixed products are taken: :class:`~bilevel.Exact` (default,
            double backward), :class:`~bilevel.CentralDifference` or :class:`~bilevel.ForwardDifference`
            (first-order gradients only: 2 or 1 gradient evaluations per product).
        warm_start: start each linear solve from the previous backward pass's solution :math:`u`
            (AmIGO's warm start; across outer steps :math:`u` changes little, so fewer iterations suffice).
            State on the object: not for use under ``torch.func`` transforms.
        residual: a :class:`~bilevel.ResidualCheck`: after each forward solve, the lower optimality
            residual is stored in ``last_residual`` (and checked against its tolerance, if it has one).

    Attributes:
        last_info: :class:`~bilevel.LinearSolveInfo` of the latest backward pass (tensors: reading
            them synchronizes, so do it outside hot loops). It is state on the strategy object: use one
            object per thread, and under ``vmap`` it holds the last batch's unbatched values.
        last_residual: the lower residual of the latest forward solve (a 0-d tensor), with ``residual``.
        last_solution: the latest linear-system solution (flat), with ``warm_start``.
    """

    linear_solver: LinearSolver = field(default_factory=CG)
    damping: float = 0.0
    mask_tol: float = 0.0
    products: Products = field(default_factory=Exact)
    warm_start: bool = False
    residual: Optional[Any] = None
    last_info: Optional[LinearSolveInfo] = field(default=None, init=False, repr=False)
    last_residual: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    last_solution: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.damping >= 0:
            raise ValueError(f"Implicit: damping must be >= 0, got {self.damping}")
        if not self.mask_tol >= 0:  # a negative tolerance would call every bounded coordinate free
            raise ValueError(f"Implicit: mask_tol must be >= 0, got {self.mask_tol}")
        check_products("Implicit", self.products)

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
        self._solver(lower, "Implicit")
        return implicit_solution(self, lower, x, init)

    def backward(self, lower: LowerProblem, x_flat: List[torch.Tensor], x_spec: Any, y_flat: List[torch.Tensor],
                 y_spec: Any, v_flat: List[torch.Tensor]) -> List[torch.Tensor]:
        r"""Vector-Jacobian product :math:`v \mapsto v^\top \mathrm{d}y^\star/\mathrm{d}x` at the solution."""
        lin = self.products.at(lower.objective, x_flat, x_spec, y_flat, y_spec)
        v = to_vector([t.to(y.dtype) for t, y in zip(v_flat, y_flat)])
        masks = lower.free_mask(y_flat, self.mask_tol, y_spec)
        rho = self.damping
        if masks is None and not rho:
            matvec, matmat, b = lin.hvp, lin.hvp_batched, v
        elif masks is None:
            def matvec(p: torch.Tensor) -> torch.Tensor:
                return torch.add(lin.hvp(p), p, alpha=rho)

            def matmat(P: torch.Tensor) -> torch.Tensor:
                return torch.add(lin.hvp_batched(P), P, alpha=rho)

            b = v
        else:
            d = to_vector(masks).to(v.dtype)
            diag = 1.0 - d + rho  # (I - D) + rho I, built once

            def matvec(p: torch.Tensor) -> torch.Tensor:
                return torch.addcmul(d * lin.hvp(d * p), diag, p)

            def matmat(P: torch.Tensor) -> torch.Tensor:
                return torch.addcmul(d * lin.hvp_batched(d * P), diag, P)

            b = d * v
        warm = self.last_solution if self.warm_start else None
        # x0 only when there is one: linear solvers written before warm starts keep working
        warm_kw = {"x0": warm} if warm is not None and warm.shape == b.shape else {}
        u, info = self.linear_solver(matvec, b, matmat, **warm_kw)
        if masks is not None:
            u = d * u
        if self.warm_start:
            self.last_solution = u.detach()
        self.last_info = info
        return [-t for t in lin.cross(u)]


def implicit_solution(strategy: Any, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
    r"""``lower.solver``'s solution from ``init``, whose backward pass is ``strategy.backward`` (a vector-Jacobian product).

    The autograd rule shared by :class:`Implicit` and the stochastic implicit strategies: the forward pass
    runs the solver without a graph (and ``strategy.residual``, if set); the backward pass calls
    ``strategy.backward(lower, x_flat, x_spec, y_flat, y_spec, v_flat)``.
    """
    x_flat, x_spec = leaves(x)
    init_flat, y_spec = leaves(init)
    meta = (strategy, lower, x_spec, y_spec, len(x_flat))
    y_flat = _ImplicitSolution.apply(meta, *x_flat, *init_flat)
    return unflatten(list(y_flat), y_spec)


class _ImplicitSolution(torch.autograd.Function):
    """y* = solver(x, init) in the forward pass; the implicit vector-Jacobian product in the backward pass."""

    generate_vmap_rule = True

    @staticmethod
    def forward(meta: Tuple, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        strategy, lower, x_spec, y_spec, n_x = meta
        x = unflatten(list(tensors[:n_x]), x_spec)
        init = unflatten(list(tensors[n_x:]), y_spec)
        y = lower.solver.run(lower, x, init, differentiable_steps=0)
        # the output is unflattened with init's structure: put the solver's leaves in that order
        y_flat = leaves_like(y, y_spec, "lower solution returned by the solver (compared with init)")
        if strategy.residual is not None:
            strategy.last_residual = strategy.residual(lower, x, unflatten(y_flat, y_spec))
        return tuple(t.detach() for t in y_flat)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple, output: Tuple[torch.Tensor, ...]) -> None:
        meta = inputs[0]
        n_x = meta[4]
        ctx.meta = meta
        ctx.n_init = len(inputs) - 1 - n_x
        ctx.save_for_backward(*inputs[1 : 1 + n_x], *output)

    @staticmethod
    def backward(ctx: Any, *v_flat: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        strategy, lower, x_spec, y_spec, n_x = ctx.meta
        saved = ctx.saved_tensors
        x_flat, y_flat = list(saved[:n_x]), list(saved[n_x:])
        if torch.is_grad_enabled() and not is_functorch_mode(list(saved) + [v for v in v_flat if v is not None]):
            # backward(create_graph=True) under plain autograd: the products below are built on detached
            # copies, so a graph-carrying result would silently miss its dependence on x and v.
            raise RuntimeError(
                "Implicit: double backward (create_graph=True) through the implicit hypergradient is not supported "
                "under plain autograd; use torch.func (e.g. torch.func.jacrev(torch.func.grad(F))) or Unrolled "
                "for second derivatives"
            )
        v_flat = [torch.zeros_like(y) if v is None else v for v, y in zip(v_flat, y_flat)]
        grads = strategy.backward(lower, x_flat, x_spec, y_flat, y_spec, v_flat)
        return (None, *grads, *([None] * ctx.n_init))


# Function.apply (with setup_context) binds default arguments through inspect.signature(forward) on every
# call; a cached __signature__ is what inspect returns first, which saves tens of microseconds per solve.
_ImplicitSolution.forward.__signature__ = inspect.signature(_ImplicitSolution.forward)
