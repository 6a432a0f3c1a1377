"""A split of an image dataset as uint8 tensors, its per-channel statistics, and the train/validation split."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["DATASET_STATS", "ImageArrays", "PathLike", "Stats", "channel_stats", "train_val_split", "with_stats"]

PathLike = Union[str, os.PathLike]
Stats = Tuple[float, ...]

#: Per-channel (mean, std) of the pixel values in [0, 1], as used by the official Fast-BAT code
#: (CIFAR-10 std 0.2470 there, 0.2471 in Fast-AT; SVHN's are the official code's values, not 0.5).
DATASET_STATS: Dict[str, Tuple[Stats, Stats]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1201, 0.1231, 0.1052)),
    "mnist": ((0.1307,), (0.3081,)),
}


@dataclass
class ImageArrays:
    """One split of an image dataset, held as tensors.

    Attributes:
        x: uint8 images, (N, C, H, W), values 0..255.
        y: int64 labels, (N,), values in 0..len(classes) - 1.
        classes: class names; ``classes[k]`` is the name of label k.
        mean: per-channel mean of the pixels in [0, 1] (C values), for ``Normalized``.
        std: per-channel standard deviation of the pixels in [0, 1] (C values).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: List[str]
    mean: Stats = field(default=(0.0,))
    std: Stats = field(default=(1.0,))

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"x must be a uint8 (N, C, H, W) tensor, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.dim() != 1 or len(self.y) != len(self.x):
            raise ValueError(
                f"y must be an int64 (N,) tensor with N = {len(self.x)}, got {self.y.dtype} {tuple(self.y.shape)}"
            )
        self.classes = [str(c) for c in self.classes]
        self.mean = tuple(float(v) for v in np.atleast_1d(np.asarray(self.mean, dtype=np.float64)))
        self.std = tuple(float(v) for v in np.atleast_1d(np.asarray(self.std, dtype=np.float64)))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """C."""
        return int(self.x.shape[1])

    @property
    def image_size(self) -> Tuple[int, int]:
        """(H, W)."""
        return int(self.x.shape[2]), int(self.x.shape[3])

    def subset(self, index: Union[torch.Tensor, slice, Sequence[int]]) -> ImageArrays:
        """The images selected by ``index`` (a slice, or integer indices), same classes and stats."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.int64, device=self.x.device)
        return replace(self, x=self.x[index], y=self.y[index])

    def to(self, device: Union[str, torch.device]) -> ImageArrays:
        """A copy with ``x`` and ``y`` on ``device``."""
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def float(self) -> torch.Tensor:
        """All images as float32 in [0, 1], (N, C, H, W)."""
        return self.x.float().div_(255)


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> Tuple[Stats, Stats]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W), in [0, 1] units.

    Works in chunks of ``chunk`` images in float64, so a large dataset is never copied as floats.
    """
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].to("cpu", torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = max(len(x) * x.shape[2] * x.shape[3], 1)
    mean = total / (count * 255.0)
    var = (total_sq / (count * 255.0**2) - mean.square()).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def with_stats(
    splits: Tuple[ImageArrays, ImageArrays], mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> Tuple[ImageArrays, ImageArrays]:
    """The splits with ``mean`` / ``std`` replaced where given."""
    changes = {}
    if mean is not None:
        changes["mean"] = tuple(mean)
    if std is not None:
        changes["std"] = tuple(std)
    if not changes:
        return splits
    return replace(splits[0], **changes), replace(splits[1], **changes)



def train_val_split(
    arrays: ImageArrays, n_val: int, seed: Optional[int] = None
) -> Tuple[ImageArrays, ImageArrays]:
    """Splits off ``n_val`` validation images.

    ``seed=None`` (default): the *last* ``n_val`` images are the validation set and the first
    ``N - n_val`` the training set, as in the official Fast-BAT code (CIFAR: 45,000 / 5,000).
    With an integer ``seed``, a ``torch.randperm`` drawn from that seed picks them instead (both
    parts keep the original order). Warns if the validation set misses a class of the train set.
    """
    n = len(arrays)
    if not 0 <= n_val < n:
        raise ValueError(f"n_val must be in [0, {n}), got {n_val}")
    if seed is None:
        train, val = arrays.subset(slice(0, n - n_val)), arrays.subset(slice(n - n_val, n))
        _warn_missing_classes(train, val)
        return train, val
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, _ = perm[n - n_val :].sort()
    train_idx, _ = perm[: n - n_val].sort()
    train, val = arrays.subset(train_idx), arrays.subset(val_idx)
    _warn_missing_classes(train, val)
    return train, val


def _warn_missing_classes(train: ImageArrays, val: ImageArrays) -> None:
    """Warns when a validation set of at least one image per class misses a class of the train
    set (a class-sorted dataset split by "last n_val")."""
    if len(val) < val.num_classes:
        return
    train_classes = set(torch.unique(train.y).tolist())
    missing = sorted(train_classes - set(torch.unique(val.y).tolist()))
    if missing:
        warnings.warn(
            f"validation split of {len(val)} images has no image of classes {missing}; "
            "is the dataset sorted by class? (pass a seed to train_val_split)",
            stacklevel=3,
        )

