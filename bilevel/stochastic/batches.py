r"""Sources of mini-batches: ``batches()`` returns the next batch.

Every stochastic solver and method takes its batches from a callable with no arguments. :func:`as_batches`
turns what users already have into one: an iterable (a ``DataLoader``, re-iterated when exhausted, so one
pass per epoch with the loader's own shuffling), or a callable. :class:`RandomBatches` draws index
tensors uniformly with replacement, on the device and from its own generator, whose state is
checkpointable.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

import torch
from torch.utils import _pytree as pytree

__all__ = ["BatchSource", "as_batches", "IterableBatches", "RandomBatches", "CheckedBatches", "BatchError", "check_batch"]

BatchSource = Union[Callable[[], Any], Iterable[Any]]


class IterableBatches:
    """Cycle over an iterable: ``next`` batch, starting a new pass (``iter(source)``) when one ends."""

    def __init__(self, source: Iterable[Any]) -> None:
        self.source = source
        self._it: Optional[Iterator[Any]] = None

    def __call__(self) -> Any:
        if self._it is not None:
            try:
                return next(self._it)
            except StopIteration:
                pass
        self._it = iter(self.source)
        try:
            return next(self._it)
        except StopIteration:
            raise ValueError("IterableBatches: the batch source is empty (or a one-shot iterator that is exhausted; "
                             "pass a re-iterable such as a DataLoader or a list, or a callable)") from None


class RandomBatches:
    r"""Index batches :math:`B \subset \{0, \dots, n-1\}`, :math:`|B|` = ``batch_size``, drawn uniformly with replacement.

    Each call returns a fresh ``int64`` tensor of indices on ``device``, independent of the previous
    ones, so a mean over the batch is an unbiased estimate of the mean over the data set. No host sync.

    Args:
        n: number of samples.
        batch_size: indices per batch.
        seed: seed of the sampler's own ``torch.Generator``.
        device: where the indices (and the generator) live.
        parallel: a :class:`~bilevel.stochastic.DataParallel`: ``batch_size`` is then the global batch, every
            rank draws the same global batch (same seed) and returns its contiguous share of
            ``batch_size / world_size`` indices, so the global batch does not depend on the number of processes.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, device: Union[str, torch.device] = "cpu",
                 parallel: Optional[Any] = None) -> None:
        if int(n) != n or n < 1 or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"RandomBatches: n and batch_size must be positive integers, got {n}, {batch_size}")
        self.n, self.batch_size, self.device = int(n), int(batch_size), torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.share: Optional[slice] = None
        if parallel is not None:
            p, r = parallel.world_size, parallel.rank
            if self.batch_size % p:
                raise ValueError(f"RandomBatches: the global batch_size {self.batch_size} is not divisible by the "
                                 f"world size {p}")
            local = self.batch_size // p
            self.share = slice(r * local, (r + 1) * local)

    def __call__(self) -> torch.Tensor:
        batch = torch.randint(self.n, (self.batch_size,), generator=self.generator, device=self.device)
        return batch if self.share is None else batch[self.share]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The generator's state, for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class BatchError(ValueError):
    """A batch source returned an empty batch or ended (``StopIteration``)."""


def check_batch(batch: Any, who: str = "bilevel") -> Any:
    """Return ``batch`` unchanged, or raise :class:`BatchError` if it is an empty container or has a tensor with no
    rows (leading dimension 0: a mean over it is NaN and its gradient zero). Shapes only: no sync. ``None`` passes
    (some objectives read ``g(x, y, None)`` as the full objective)."""
    if isinstance(batch, (list, tuple, dict)) and len(batch) == 0:
        raise BatchError(f"{who}: the batch source returned an empty {type(batch).__name__}")
    for leaf in (batch,) if isinstance(batch, torch.Tensor) else pytree.tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.ndim >= 1 and leaf.shape[0] == 0:
            raise BatchError(f"{who}: the batch source returned an empty batch (a tensor of shape {tuple(leaf.shape)}); "
                             "a mean over no samples is NaN and its gradient zero")
    return batch


class CheckedBatches:
    """A batch source as the solvers and methods call it: the next batch, checked by :func:`check_batch`.

    A ``StopIteration`` from a callable source becomes a :class:`BatchError` (left alone it would end the
    caller's own loop silently, e.g. inside ``map``). Other attributes (``state_dict``, ...) are the source's.
    """

    def __init__(self, source: Callable[[], Any]) -> None:
        self.source = source

    def __call__(self) -> Any:
        try:
            batch = self.source()
        except StopIteration:
            raise BatchError("bilevel: the batch source raised StopIteration (an exhausted iterator behind a callable?); "
                             "pass the iterable itself (it is re-iterated each pass) or a callable that always returns "
                             "a batch") from None
        return check_batch(batch)

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"CheckedBatches({self.source!r})"


def as_batches(source: Optional[BatchSource]) -> Optional[Callable[[], Any]]:
    """A no-argument callable returning the next batch, checked (:class:`CheckedBatches`): ``source`` if callable,
    else an :class:`IterableBatches` over it.

    ``None`` stays ``None`` (full batch: the objective is called without a batch argument).
    """
    if source is None or isinstance(source, CheckedBatches):
        return source
    if callable(source):
        return CheckedBatches(source)
    if isinstance(source, torch.Tensor) or not hasattr(source, "__iter__"):
        raise TypeError(f"bilevel: a batch source must be a callable or an iterable (e.g. a DataLoader), got "
                        f"{type(source).__name__}")
    return CheckedBatches(IterableBatches(source))
