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

__all__ = ["BatchSource", "as_batches", "IterableBatches", "RandomBatches"]

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
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, device: Union[str, torch.device] = "cpu") -> None:
        if int(n) != n or n < 1 or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"RandomBatches: n and batch_size must be positive integers, got {n}, {batch_size}")
        self.n, self.batch_size, self.device = int(n), int(batch_size), torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        return torch.randint(self.n, (self.batch_size,), generator=self.generator, device=self.device)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The generator's state, for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def as_batches(source: Optional[BatchSource]) -> Optional[Callable[[], Any]]:
    """A no-argument callable returning the next batch: ``source`` itself if callable, else :class:`IterableBatches`.

    ``None`` stays ``None`` (full batch: the objective is called without a batch argument).
    """
    if source is None or callable(source):
        return source
    if isinstance(source, torch.Tensor) or not hasattr(source, "__iter__"):
        raise TypeError(f"bilevel: a batch source must be a callable or an iterable (e.g. a DataLoader), got "
                        f"{type(source).__name__}")
    return IterableBatches(source)
