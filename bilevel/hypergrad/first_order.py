r"""First-order hypergradient: :math:`y^\star` is a constant (Danskin's theorem), or moves with ``init`` (FOMAML)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from .._autodiff import detach_tree
from .._tree import Tree, is_functorch_mode, leaves, leaves_like, unflatten
from ..problem import LowerProblem
from .base import Strategy

__all__ = ["FirstOrder"]


@dataclass(frozen=True)
class FirstOrder(Strategy):
    r"""Treat the lower solution as independent of ``x``: :math:`\mathrm{d}F/\mathrm{d}x \approx \nabla_x f(x, y^\star)`.

    Exact when :math:`f = g` at an unconstrained (or :math:`x`-independent-constraint) minimizer, by
    Danskin's theorem: this is the gradient of min-max adversarial training (PGD-AT, Fast-AT). Costs
    nothing beyond the lower solve, which runs without a graph.

    The returned :math:`y^\star` stays connected to ``x`` with a zero Jacobian, so an upper objective that
    depends on ``x`` only through :math:`y^\star` (iMAML's query loss) gets an exact zero hypergradient
    (``x.grad`` filled with zeros) rather than PyTorch's "element 0 of tensors does not require grad".

    Args:
        through_init: take :math:`\mathrm{d}y^\star/\mathrm{d}\,\text{init} = I` instead of 0: the
            gradient reaching :math:`y^\star` is passed to ``init`` unchanged. With ``init`` the
            meta-parameters (MAML's adaptation starts there), this is first-order MAML (FOMAML, Finn et
            al. 2017, Sec. 5.2): the meta-gradient is the query-loss gradient at the adapted weights.
            ``init`` must then be (a function of) tensors that require grad.
    """

    through_init: bool = False

    def solve(self, lower: LowerProblem, x: Tree, init: Tree) -> Tree:
        solver = self._solver(lower, "FirstOrder")
        # run() detaches x and init itself; the detach keeps the guarantee for solvers that override run()
        y = detach_tree(solver.run(lower, x, init, differentiable_steps=0))
        x_flat, _ = leaves(x)
        init_flat, y_spec = leaves(init)
        tracked = [t for t in (init_flat if self.through_init else []) + x_flat]
        if not torch.is_grad_enabled() or not (is_functorch_mode(tracked) or any(t.requires_grad for t in tracked)):
            return y
        y_flat = leaves_like(y, y_spec, "lower solution returned by the solver (compared with init)")
        out = _ConstantSolution.apply((len(x_flat), len(init_flat), self.through_init), *x_flat, *init_flat, *y_flat)
        return unflatten(list(out), y_spec)


class _ConstantSolution(torch.autograd.Function):
    """``y`` unchanged in the forward pass; zero cotangents for ``x``, and ``v`` (or zero) for ``init``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(meta: Tuple, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        n_x, n_init, _ = meta
        return tuple(t.clone() for t in tensors[n_x + n_init:])

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple, output: Tuple[torch.Tensor, ...]) -> None:
        ctx.meta = inputs[0]
        n_x, n_init, through = ctx.meta
        # only shapes/dtypes are needed for the zeros: keep no activations alive
        ctx.like = [(t.shape, t.dtype, t.device) for t in inputs[1:1 + n_x + (0 if through else n_init)]]

    @staticmethod
    def backward(ctx: Any, *v: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        n_x, n_init, through = ctx.meta
        zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.like]
        if through:
            v_init = [None if g is None else g for g in v]
            return (None, *zeros[:n_x], *v_init, *([None] * len(v)))
        return (None, *zeros, *([None] * len(v)))


_ConstantSolution.forward.__signature__ = inspect.signature(_ConstantSolution.forward)
