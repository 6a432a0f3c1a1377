"""Small pytree helpers over ``torch.utils._pytree``.

Upper variables ``x`` and lower variables ``y`` may be a tensor, a tuple/list/dict of tensors
(nested), or ``dict(module.named_parameters())``. The linear algebra of the implicit strategy works
on one flat vector; these helpers convert between the two views.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

Tree = Any

__all__ = ["Tree", "leaves", "leaves_like", "unflatten", "tree_map", "to_vector", "from_vector", "is_functorch_mode",
           "is_batched", "is_vmapped", "plain_values"]


# The spec of a bare tensor, shared so that the common single-tensor case skips the pytree machinery.
_LEAF_SPEC = pytree.tree_flatten(torch.empty(0))[1]


def leaves(tree: Tree) -> Tuple[List[torch.Tensor], Any]:
    """Flatten ``tree`` into its tensor leaves and a spec; raises on non-tensor leaves."""
    if isinstance(tree, torch.Tensor):
        return [tree], _LEAF_SPEC
    flat, spec = pytree.tree_flatten(tree)
    for i, leaf in enumerate(flat):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"bilevel: every leaf of a variable tree must be a torch.Tensor; leaf {i} is {type(leaf).__name__}"
            )
    return flat, spec


def leaves_like(tree: Tree, spec: Any, what: str = "tree") -> List[torch.Tensor]:
    """The tensor leaves of ``tree`` in the order of ``spec``'s structure, matching dicts by key.

    Two dicts with the same keys in another insertion order flatten in different orders; this puts the
    leaves of ``tree`` where ``spec`` expects them, and raises ``ValueError`` if the structures differ.
    """
    flat, tree_spec = leaves(tree)
    if tree_spec == spec:
        return flat
    index_tree = unflatten(list(range(spec.num_leaves)), spec)
    out: List[Any] = [None] * spec.num_leaves

    def walk(t: Any, idx: Any) -> None:
        if isinstance(idx, int):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"bilevel: the {what} has a {type(t).__name__} where a tensor is expected")
            out[idx] = t
        elif isinstance(idx, Mapping) and isinstance(t, Mapping) and set(t.keys()) == set(idx.keys()):
            for k in idx:
                walk(t[k], idx[k])
        elif isinstance(idx, (list, tuple)) and isinstance(t, (list, tuple)) and len(t) == len(idx):
            for ti, ii in zip(t, idx):
                walk(ti, ii)
        else:
            raise ValueError(f"bilevel: the {what} has structure {tree_spec}, expected {spec}")

    walk(tree, index_tree)
    return out


def unflatten(flat: Sequence[torch.Tensor], spec: Any) -> Tree:
    """The tree with structure ``spec`` (from :func:`leaves`) and leaves ``flat``; the inverse of :func:`leaves`."""
    if spec is _LEAF_SPEC:
        (leaf,) = flat
        return leaf
    return pytree.tree_unflatten(list(flat), spec)


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """``fn`` applied leaf by leaf to ``tree`` (and to the matching leaves of ``rest``), in the same structure."""
    if isinstance(tree, torch.Tensor) and all(isinstance(t, torch.Tensor) for t in rest):
        return fn(tree, *rest)
    return pytree.tree_map(fn, tree, *rest)


def to_vector(flat: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one 1-D vector (a view when there is a single contiguous leaf)."""
    if len(flat) == 1:
        return flat[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in flat])


def from_vector(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Split a 1-D vector back into tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[start : start + n].view_as(t))
        start += n
    return out


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def is_functorch_mode(tensors: Sequence[torch.Tensor] = ()) -> bool:
    """True inside a torch.func transform (grad, vmap, ...), or when any tensor is wrapped by one.

    The transform stack is what matters, not only the variables: under ``vmap(..., in_dims=(None, 0))``
    with a shared (unbatched) ``x`` and batched data captured by ``g``, neither ``x`` nor ``y`` is
    wrapped, yet ``requires_grad_`` and ``torch.autograd.grad`` on them are not allowed.
    """
    # (torch.compile traces the stack query as non-empty: there the variables decide, as before)
    if not _is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    check = torch._C._functorch.is_functorch_wrapped_tensor
    return any(check(t) for t in tensors)


def is_vmapped() -> bool:
    """True inside a ``torch.func.vmap``, at any level of the transform stack (``vmap(grad(F))`` included)."""
    if _is_compiling():
        return False
    f = torch._C._functorch
    get_stack = getattr(f, "get_interpreter_stack", None)
    if get_stack is not None:
        stack = get_stack() or []  # None outside every transform
    else:  # pragma: no cover - an older torch shows only the innermost transform
        top = f.peek_interpreter_stack()
        stack = [] if top is None else [top]
    return any(level.key() == f.TransformType.Vmap for level in stack)


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by ``vmap`` (its plain values have more dimensions than it shows): a per-task
    tensor, whose values cannot be read inside the transform."""
    return plain_values(t).dim() != t.dim()


def plain_values(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` as a plain tensor, outside every ``torch.func`` wrapper, ``vmap`` dims leading.

    Under ``vmap`` a diagnostic computed per task (a residual, a linear solve's info) is a batched tensor that
    dies with the transform; its unwrapped values, with one leading dimension per ``vmap`` level (outermost
    first), can be kept on a strategy object and read (a host sync) afterwards or right away.
    """
    f = torch._C._functorch
    dims: List[int] = []  # positions of the vmap dims in the current tensor, innermost level first
    while f.is_functorch_wrapped_tensor(t):
        bdim = f.maybe_get_bdim(t) if f.is_batchedtensor(t) else -1
        t = f.get_unwrapped(t)
        if bdim >= 0:
            dims = [d + 1 if d >= bdim else d for d in dims] + [bdim]
    with torch._C._DisableFuncTorch():  # ops on the unwrapped tensor must not be wrapped again
        return t.movedim(dims[::-1], list(range(len(dims)))).detach()
