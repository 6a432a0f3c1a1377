"""Batches of a dataset held whole on one device: one ``index_select``, a ``/255`` and a batched
augmentation per batch, no host synchronization."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch

from .arrays import ImageArrays
from .augment import Augment

__all__ = ["DeviceLoader"]


class DeviceLoader:
    """Batches of a whole dataset kept on one device.

    The uint8 images are copied to ``device`` once. Each pass (``iter``) draws a permutation with
    ``generator`` (if ``shuffle``), gathers each batch with ``index_select``, converts it to float32
    in [0, 1] (``/ 255``, like ``ToTensor``), applies ``augment`` and optionally converts to
    channels-last. Data parallel: with ``world_size > 1`` every rank draws the same permutation and
    augmentation of global batch ``j`` and yields its strided rows ``[rank::world_size]`` (so
    ``batch_size`` is the global batch). No host synchronization per batch. Given the generator's seed the sequence of
    batches is deterministic; save / restore ``loader.generator.get_state()`` to continue a run.

    Args:
        arrays: the split to serve.
        batch_size: images per batch; the last one is smaller unless ``drop_last``.
        device: where data and batches live (default: where ``arrays.x`` is).
        shuffle: a fresh permutation each pass; otherwise the stored order.
        drop_last: drop the last incomplete batch.
        augment: batched augmentation, or None.
        generator: random source; default a new generator on ``device`` seeded with ``seed``.
        seed: seed of the default generator.
        channels_last: yield images in ``torch.channels_last`` memory format.
        rank, world_size: this process's share of every batch (see above).

    Yields:
        (x, y): float32 (B, C, H, W) in [0, 1] and int64 (B,), on ``device``.
    """

    def __init__(
        self,
        arrays: ImageArrays,
        batch_size: int,
        device: Optional[Union[str, torch.device]] = None,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: Optional[Augment] = None,
        generator: Optional[torch.Generator] = None,
        seed: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.device = torch.device(device) if device is not None else arrays.x.device
        self.arrays = arrays
        self.x = arrays.x.to(self.device)
        self.y = arrays.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        self.generator = generator

    @property
    def num_samples(self) -> int:
        """Number of images in the dataset."""
        return len(self.y)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        perm = None
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=self.generator, device=self.generator.device)
            perm = perm.to(self.device, non_blocking=True)
        for i in range(len(self)):
            start, stop = i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)
            if perm is None:
                xb, yb = self.x[start:stop], self.y[start:stop]
            else:
                idx = perm[start:stop]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            xb = xb.float().div_(255)
            if self.augment is not None:
                xb = self.augment(xb, self.generator)  # the global batch is augmented as one
            if self.world_size > 1:
                xb, yb = xb[self.rank::self.world_size], yb[self.rank::self.world_size]
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb

