"""The front door: load_dataset by name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from applications.vision.data import (
    DATASET_STATS,
    load_dataset,
)


def test_load_dataset_front_door(tmp_path: Path, mnist5k: tuple, make_tree: Callable[..., dict]) -> None:
    train, _ = load_dataset("mnist5k")
    assert torch.equal(train.x, mnist5k[0].x)
    with pytest.raises(ValueError, match="mnist5k, digits, image_folder, npz, cifar10, cifar100, svhn"):
        load_dataset("imagenet")
    for name, path in [
        ("image_folder", tmp_path / "missing"),
        ("npz", tmp_path / "missing.npz"),
        ("cifar10", tmp_path / "missing.tar.gz"),
        ("cifar100", tmp_path / "missing.npz"),
    ]:
        with pytest.raises(FileNotFoundError, match=f"{name}.*{path}"):
            load_dataset(name, path)
    with pytest.raises(FileNotFoundError, match="svhn"):
        load_dataset("svhn", tmp_path / "no_root", download=False)
    with pytest.raises(FileNotFoundError, match="needs a path"):
        load_dataset("npz")
    make_tree(tmp_path / "tree", {("train", "cat"): 3, ("train", "ant"): 2, ("train", "bee"): 4, ("test", "bee"): 2})
    folder_train, _ = load_dataset("image-folder", tmp_path / "tree", limit_per_class=1, cache_dir=tmp_path / "c")
    assert len(folder_train) == 3
    as_cifar, _ = load_dataset("cifar100", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert (as_cifar.mean, as_cifar.std) == DATASET_STATS["cifar100"]
