r"""``nn.Module``\ s as upper and lower variables: the module is a view of a parameter tree.

A strategy works on trees of tensors; a network enters as ``dict(module.named_parameters())``:

* :func:`parameters` reads the tree (detached copies by default: a lower variable's starting point);
* :func:`functional` evaluates the module at any tree, ``functional(net)(w, inputs)``, for use inside
  ``g`` and ``f``, and composes with ``torch.func`` (``vmap`` over tasks);
* :func:`load_parameters` writes a solved tree back into the module, for evaluation and checkpoints.

:func:`bilevel.solve` also accepts a module directly: as ``x`` it stands for its live parameters (so
``backward()`` fills ``module.<param>.grad``), as ``init`` for a detached copy of them.

**Buffers.** Strategies evaluate ``g`` many times (Hessian-vector products, differences, residual checks),
so ``g`` must be free of side effects. :func:`functional` runs the module with its buffers read but never
written: a BatchNorm layer in training mode normalizes with the batch statistics, as a real training step
does, but its running statistics (and ``num_batches_tracked``) do not change. They change only when the
user calls the module itself, on real training steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping

import torch
from torch import nn

__all__ = ["parameters", "functional", "load_parameters", "frozen_statistics"]


def parameters(module: nn.Module, *, detach: bool = True) -> Dict[str, torch.Tensor]:
    """``module``'s parameters as a ``{name: tensor}`` tree: detached copies (default), or the live ``nn.Parameter``\\ s."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"bilevel.parameters: expected an nn.Module, got {type(module).__name__}")
    if detach:
        return {name: p.detach().clone() for name, p in module.named_parameters()}
    return dict(module.named_parameters())


@contextlib.contextmanager
def frozen_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, batch-norm layers in training mode use batch statistics and update no running statistics."""
    changed = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def functional(module: nn.Module) -> Callable[..., Any]:
    r"""``call(params, *args, **kwargs)``: ``module(*args, **kwargs)`` with its parameters replaced by ``params``.

    ``params`` is a ``{name: tensor}`` tree (all of the module's parameters, or a subset: the others keep
    their current values). Buffers are read and never written (see the module docstring). Built on
    ``torch.func.functional_call``, so it composes with ``grad``, ``vmap`` and the strategies.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"bilevel.functional: expected an nn.Module, got {type(module).__name__}")
    names = {name for name, _ in module.named_parameters()}

    def call(params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        if not isinstance(params, Mapping):
            raise TypeError(f"bilevel.functional: params must be a {{name: tensor}} dict (bilevel.parameters(module)), "
                            f"got {type(params).__name__}")
        unknown = sorted(set(params) - names)
        if unknown:
            raise KeyError(f"bilevel.functional: {type(module).__name__} has no parameters {unknown[:5]}")
        with frozen_statistics(module):
            return torch.func.functional_call(module, dict(params), args, kwargs)

    return call


def load_parameters(module: nn.Module, params: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``params`` (a solved tree) into ``module``'s parameters in place, without a graph; returns ``module``.

    Every key must name a parameter of the same shape; parameters not in ``params`` are left as they are.
    """
    own = dict(module.named_parameters())
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise KeyError(f"bilevel.load_parameters: {type(module).__name__} has no parameters {unknown[:5]}")
    for name, value in params.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"bilevel.load_parameters: {name} has shape {tuple(value.shape)}, the module's "
                             f"{tuple(own[name].shape)}")
    with torch.no_grad():
        for name, value in params.items():
            own[name].copy_(value)
    return module
