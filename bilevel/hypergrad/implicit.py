r"""Implicit hypergradient: the implicit function theorem on Hessian-vector products."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch

from .._tree import Tree, is_batched, is_functorch_mode, is_vmapped, leaves, leaves_like, plain_values, to_vector, unflatten
from ..convergence import ConvergenceCheck, HypergradientWarning
from ..linalg import CG, LinearSolveInfo, LinearSolver
from ..problem import LowerProblem
from ..products import Exact, Products, check_products
from .base import Strategy

__all__ = ["Implicit", "implicit_solution", "masked_operator"]


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
            State on the object, so one sequence of solves: plain autograd or ``torch.func.grad``; refused
            under ``vmap``, where one state would serve every task.
        residual: a :class:`~bilevel.ResidualCheck`: after each forward solve, the lower optimality
            residual is stored in ``last_residual`` (and checked against its tolerance, if it has one).
        check: a :class:`~bilevel.ConvergenceCheck` (the default: on the first solve and every 100th, warn
            with :class:`~bilevel.HypergradientWarning` when the lower problem or the linear system is not
            solved, one host sync per checked solve); ``None`` turns it off.

    Attributes:
        last_info: :class:`~bilevel.LinearSolveInfo` of the latest backward pass (tensors: reading
            them synchronizes, so do it outside hot loops). It is state on the strategy object: use one
            object per thread. Under ``vmap`` its tensors hold one value per task (leading dimension).
        last_residual: the lower residual of the latest forward solve (a 0-d tensor, one value per task
            under ``vmap``), with ``residual`` or on a checked solve.
        last_solution: the latest linear-system solution (flat), with ``warm_start``.
    """

    linear_solver: LinearSolver = field(default_factory=CG)
    damping: float = 0.0
    mask_tol: float = 0.0
    products: Products = field(default_factory=Exact)
    warm_start: bool = False
    residual: Optional[Any] = None
    check: Optional[ConvergenceCheck] = field(default_factory=ConvergenceCheck)
    last_info: Optional[LinearSolveInfo] = field(default=None, init=False, repr=False)
    last_residual: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    last_solution: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    solves: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.check is not None and not isinstance(self.check, ConvergenceCheck):
            raise TypeError(f"Implicit: check must be a bilevel.ConvergenceCheck or None, got {self.check!r}")
        if not self.damping >= 0:
            raise ValueError(f"Implicit: damping must be >= 0, got {self.damping}")
        if not self.mask_tol >= 0:  # a negative tolerance would call every bounded coordinate free
            raise ValueError(f"Implicit: mask_tol must be >= 0, got {self.mask_tol}")
        check_products("Implicit", self.products)

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
        solver = self._solver(lower, "Implicit")
        if getattr(solver, "batches", None) is not None and not _takes_two_arguments(lower.objective):
            raise TypeError(
                "Implicit: the solver draws mini-batches (g(x, y, batch)), but Implicit's backward pass linearizes the "
                "full objective g(x, y); give g a default batch meaning the full data (def g(x, y, batch=None)), or use "
                "a stochastic strategy (AmIGO, StocBiO) whose backward pass draws its own batches")
        if self.warm_start and is_vmapped():
            raise ValueError(_WARM_UNDER_VMAP)
        return implicit_solution(self, lower, x, init)

    def backward(self, lower: LowerProblem, x_flat: List[torch.Tensor], x_spec: Any, y_flat: List[torch.Tensor],
                 y_spec: Any, v_flat: List[torch.Tensor]) -> List[torch.Tensor]:
        r"""Vector-Jacobian product :math:`v \mapsto v^\top \mathrm{d}y^\star/\mathrm{d}x` at the solution."""
        lin = self.products.at(lower.objective, x_flat, x_spec, y_flat, y_spec)
        v = to_vector([t.to(y.dtype) for t, y in zip(v_flat, y_flat)])
        masks = lower.free_mask(y_flat, self.mask_tol, y_spec)
        d = None if masks is None else to_vector(masks).to(v.dtype)
        matvec = masked_operator(lin.hvp, d, self.damping)
        matmat = masked_operator(lin.hvp_batched, d, self.damping)  # rows (k, n): the mask broadcasts
        b = v if d is None else d * v
        if self.warm_start and is_batched(b):  # a backward pass batched apart from the forward one (jacrev)
            raise ValueError(_WARM_UNDER_VMAP)
        warm = self.last_solution if self.warm_start else None
        # x0 only when there is one: linear solvers written before warm starts keep working
        warm_kw = {"x0": warm} if warm is not None and warm.shape == b.shape else {}
        u, info = self.linear_solver(matvec, b, matmat, **warm_kw)
        if d is not None:
            u = d * u
        if self.warm_start:
            self.last_solution = plain_values(u)  # outlives a torch.func.grad call
        self.last_info = _plain_info(info)
        cross = lin.cross(u)
        if getattr(lin, "x_unused", False):
            warnings.warn(_G_WITHOUT_X, HypergradientWarning, stacklevel=4)
        return [-t for t in cross]


_G_WITHOUT_X = (
    "Implicit: grad_y g does not depend on x (it has no path to any leaf of x), so y* does not move with x and the "
    "hypergradient through it is zero. The usual cause is a g that reads x from an enclosing scope instead of its "
    "first argument. If y* truly does not depend on x, FirstOrder() gives the same zero without the linear solve.")

_WARM_UNDER_VMAP = (
    "Implicit(warm_start=True) under vmap: the warm start is one linear-system solution kept on the strategy "
    "object, and each task's system differs; use warm_start=False under vmap (or one Implicit per task in a loop)")


def _plain_info(info: LinearSolveInfo) -> LinearSolveInfo:
    """``info`` with its tensors outside every ``torch.func`` wrapper (one value per task under ``vmap``)."""
    def plain(t: Any) -> Any:
        return plain_values(t) if isinstance(t, torch.Tensor) else t

    return LinearSolveInfo(plain(info.residual_norm), plain(info.rhs_norm), info.iterations,
                           plain(getattr(info, "min_curvature", None)))


def _takes_two_arguments(fn: Callable[..., Any]) -> bool:
    """Whether ``fn(x, y)`` binds (``True`` when the signature cannot be read)."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call decide
        return True
    return True


def masked_operator(product: Callable[[torch.Tensor], torch.Tensor], mask: Optional[torch.Tensor],
                    damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The implicit system's operator :math:`p \mapsto D\,A(Dp) + ((I - D) + \rho I)\,p` from :math:`p \mapsto Ap`.

    ``mask`` is the flat 0/1 vector :math:`D` of free coordinates (``None``: unconstrained, :math:`D = I`),
    ``damping`` is :math:`\rho`. The result is symmetric positive definite when :math:`A` is on the free
    coordinates, and acts as the identity (plus damping) on the active ones. ``product`` may act on rows of a
    matrix (shape (k, n)); the mask broadcasts.
    """
    if mask is None:
        return product if not damping else (lambda p: torch.add(product(p), p, alpha=damping))
    diag = 1.0 - mask + damping  # (I - D) + rho I, built once
    return lambda p: torch.addcmul(mask * product(mask * p), diag, p)


def implicit_solution(strategy: Any, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
    r"""``lower.solver``'s solution from ``init``, whose backward pass is ``strategy.backward`` (a vector-Jacobian product).

    The autograd rule shared by :class:`Implicit` and the stochastic implicit strategies: the forward pass
    runs the solver without a graph (and ``strategy.residual``, if set); the backward pass calls
    ``strategy.backward(lower, x_flat, x_spec, y_flat, y_spec, v_flat)``.
    """
    x_flat, x_spec = leaves(x)
    init_flat, y_spec = leaves(init)
    check = getattr(strategy, "check", None)
    checking = False
    if check is not None:
        strategy.solves += 1
        checking = check.due(strategy.solves)
    meta = (strategy, lower, x_spec, y_spec, len(x_flat), checking)
    y_flat = _ImplicitSolution.apply(meta, *x_flat, *init_flat)
    return unflatten(list(y_flat), y_spec)


def _minimized(lower: LowerProblem) -> LowerProblem:
    """The problem the solver's fixed points solve (``lower`` plus a weight decay's L2 term), for the backward pass."""
    minimized = getattr(lower.solver, "minimized", None)
    return lower if minimized is None else minimized(lower)


class _ImplicitSolution(torch.autograd.Function):
    """y* = solver(x, init) in the forward pass; the implicit vector-Jacobian product in the backward pass."""

    generate_vmap_rule = True

    @staticmethod
    def forward(meta: Tuple, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        strategy, lower, x_spec, y_spec, n_x, checking = meta
        x = unflatten(list(tensors[:n_x]), x_spec)
        init = unflatten(list(tensors[n_x:]), y_spec)
        y = lower.solver.run(lower, x, init, differentiable_steps=0)
        # the output is unflattened with init's structure: put the solver's leaves in that order
        y_flat = leaves_like(y, y_spec, "lower solution returned by the solver (compared with init)")
        y_tree = unflatten(y_flat, y_spec)
        if strategy.residual is not None:
            strategy.last_residual = plain_values(strategy.residual(lower, x, y_tree))
        if checking:
            residual = strategy.check.lower(_minimized(lower), x, init, y_tree)
            if residual is not None and strategy.residual is None:
                strategy.last_residual = residual
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
        strategy, lower, x_spec, y_spec, n_x, checking = ctx.meta
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
        grads = strategy.backward(_minimized(lower), x_flat, x_spec, y_flat, y_spec, v_flat)
        if checking:
            strategy.check.linear(strategy.last_info, getattr(strategy, "damping", 0.0), strategy.linear_solver)
        return (None, *grads, *([None] * ctx.n_init))


# Function.apply (with setup_context) binds default arguments through inspect.signature(forward) on every
# call; a cached __signature__ is what inspect returns first, which saves tens of microseconds per solve.
_ImplicitSolution.forward.__signature__ = inspect.signature(_ImplicitSolution.forward)
