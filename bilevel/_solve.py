r"""The differentiable entry points: :func:`solve` and :func:`value_and_hypergrad`."""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ._autodiff import reaches
from ._tree import Tree, is_functorch_mode, leaves, to_vector, unflatten
from .convergence import HypergradientWarning
from .hypergrad.base import Strategy
from .modules import parameters
from .problem import LowerProblem

__all__ = ["solve", "value_and_hypergrad"]


def _check_inputs(lower: LowerProblem, x: Tree, init: Tree, strategy: Strategy) -> None:
    if not isinstance(lower, LowerProblem):
        raise TypeError(f"solve: `lower` must be a bilevel.LowerProblem, got {type(lower).__name__}")
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"solve: `strategy` must be a bilevel strategy object (Implicit(), Unrolled(), Linearized(...), "
            f"FirstOrder()), got {strategy!r}"
        )
    _check_floating(leaves(x)[0], "solve")
    lower.check(init)


def _check_floating(x_flat: List[torch.Tensor], who: str) -> None:
    for i, t in enumerate(x_flat):
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{who}: the upper variable x must be floating point (leaf {i} is {t.dtype}): a hypergradient "
                            "needs a differentiable x; convert it with .double() or .float()")


def _warn_if_independent(strategy: Strategy, x: Tree, y_flat: List[torch.Tensor]) -> None:
    """On a strategy object's first differentiable solve: warn when y* has no graph path to x (autograd only).

    Only strategies whose ``_unreached_note`` says so (Unrolled, Linearized): :class:`~bilevel.Implicit` checks in
    its backward pass, :class:`~bilevel.FirstOrder` is independent of ``x`` by design. The walk visits the graph's
    nodes once, so it runs on the first solve only.
    """
    note = strategy._unreached_note()
    if note is None or strategy.__dict__.get("_graph_checked") or not torch.is_grad_enabled():
        return
    x_flat, _ = leaves(x)
    if not any(t.requires_grad for t in x_flat) or is_functorch_mode(x_flat + y_flat):
        return
    strategy.__dict__["_graph_checked"] = True  # not a dataclass field: equality and repr unchanged
    if not reaches(y_flat, x_flat):
        why, hint = note
        warnings.warn(
            f"{type(strategy).__name__}: the lower solution has no graph to x (grad_y g does not depend on x{why}), so "
            "the hypergradient through y* is zero. The usual cause is a g that reads x from an enclosing scope instead "
            f"of its first argument{hint}.", HypergradientWarning, stacklevel=3)


def solve(lower: LowerProblem, x: Tree, init: Tree, strategy: Strategy, *, check_finite: Optional[bool] = None) -> Tree:
    r"""Solve the lower problem at ``x`` from ``init`` and return :math:`y^\star(x)`, differentiable in ``x``.

    The autograd graph from the returned tree to ``x`` is the one the strategy defines, so
    ``f(x, y).backward()`` leaves the total hypergradient
    :math:`\nabla_x f + (\mathrm{d}y^\star/\mathrm{d}x)^\top \nabla_y f` in ``x.grad`` and any
    ``torch.optim`` optimizer can take the step.

    Args:
        lower: the lower problem (objective, constraint, solver).
        x: the upper variable: a tensor, a tree of tensors, or an ``nn.Module`` (its live parameters,
            ``dict(module.named_parameters())``: ``backward()`` fills their ``.grad``). Floating point; if no
            leaf requires grad (and no ``torch.func`` transform is active), the result is a value without a
            graph, as under ``torch.no_grad()``: ``f(x, y).backward()`` then has nothing to reach.
        init: the solver's starting point (or the linearization point for :class:`~bilevel.Linearized`),
            a tree shaped like the lower variable, or an ``nn.Module`` (a detached copy of its parameters,
            :func:`bilevel.parameters`; ``g`` then receives a ``{name: tensor}`` dict, evaluated with
            :func:`bilevel.functional`). The module that is also ``x`` stands for ``x`` itself, as a tree passed
            twice does: MAML's ``solve(lower, net, net, Unrolled())`` differentiates through the start.
        strategy: :class:`~bilevel.Implicit`, :class:`~bilevel.Unrolled`, :class:`~bilevel.Linearized`
            or :class:`~bilevel.FirstOrder`.
        check_finite: raise ``FloatingPointError`` if the solution has NaN or Inf. ``None`` (default): check
            when the solution lives on the CPU, where reading a boolean costs nothing, and not on an accelerator,
            where it would be a host synchronization per call, the one a training loop otherwise avoids
            (check the loss every N steps instead). ``True`` checks everywhere, ``False`` nowhere.
    """
    x_module = x if isinstance(x, nn.Module) else None
    if x_module is not None:
        x = parameters(x_module, detach=False)
    if isinstance(init, nn.Module):
        # the same module twice is one variable, as a tree passed twice is (MAML: the start is x)
        init = x if init is x_module else parameters(init)
    _check_inputs(lower, x, init, strategy)
    y = strategy.solve(lower, x, init)
    y_flat, _ = leaves(y)
    _warn_if_independent(strategy, x, y_flat)
    if check_finite is None:
        check_finite = all(t.device.type == "cpu" for t in y_flat)
    if check_finite:
        if not is_functorch_mode(y_flat) and not bool(torch.isfinite(to_vector([t.detach() for t in y_flat])).all()):
            raise FloatingPointError(
                f"solve: the lower solution contains NaN or Inf (solver {lower.solver!r}, strategy {strategy!r}); "
                "check the objective and lower the solver's step size"
            )
    return y


def _rebound(init: Tree, x_flat: List[torch.Tensor], xs: List[torch.Tensor]) -> Tree:
    """``init`` with every leaf that is one of x's tensors replaced by its differentiable copy in ``xs``: an init that
    is x (MAML's ``theta, theta``) starts from the x being differentiated, as in :func:`solve`."""
    if isinstance(init, nn.Module):
        return init
    position = {id(t): i for i, t in enumerate(x_flat)}
    init_flat, spec = leaves(init)
    return unflatten([xs[position[id(t)]] if id(t) in position else t for t in init_flat], spec)


def value_and_hypergrad(upper: Callable[[Tree, Tree], torch.Tensor], lower: LowerProblem, x: Tree, init: Tree,
                        strategy: Strategy) -> Tuple[torch.Tensor, Tree]:
    r"""Functional form: return :math:`F(x) = f(x, y^\star(x))` and :math:`\mathrm{d}F/\mathrm{d}x` (a tree like ``x``).

    ``x`` is not modified and no ``.grad`` is written. Under ``torch.func`` transforms use
    ``torch.func.grad(lambda x: upper(x, solve(lower, x, init, strategy)))`` instead: every strategy composes.
    """
    if isinstance(x, nn.Module):  # its live parameters; the same module as init is that same tree (as in solve)
        module, x = x, parameters(x, detach=False)
        init = x if init is module else init
    x_flat, x_spec = leaves(x)
    _check_floating(x_flat, "value_and_hypergrad")
    with torch.enable_grad():
        xs = [t.detach().requires_grad_() for t in x_flat]
        x_in = unflatten(xs, x_spec)
        y = solve(lower, x_in, _rebound(init, x_flat, xs), strategy)
        value = upper(x_in, y)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise ValueError("value_and_hypergrad: the upper objective must return a scalar tensor")
        # e.g. FirstOrder with an f that depends on x only through y: the hypergradient is zero
        grads = torch.autograd.grad(value, xs, allow_unused=True) if value.requires_grad else [None] * len(xs)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, xs)]
    return value.detach(), unflatten(grads, x_spec)
