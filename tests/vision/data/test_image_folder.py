"""Image-folder trees and archives: exact pixels, order, cache, errors; the CIFAR-10 JPEG copy."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from applications.vision.data import (
    DATASET_STATS,
    load_dataset,
    load_image_folder,
)
from applications.vision.data import arrays as arrays_module
from applications.vision.data import image_folder as image_folder_module

COUNTS = {("train", "cat"): 3, ("train", "ant"): 2, ("train", "bee"): 4, ("test", "bee"): 2, ("test", "ant"): 1}


def expected_split(written: dict, split: str) -> tuple:
    keys = sorted(k for k in written if k[0] == split)
    classes = sorted({k[1] for k in written if k[0] == "train"})
    x = np.stack([written[k].transpose(2, 0, 1) for k in keys])
    y = np.array([classes.index(k[1]) for k in keys])
    return torch.from_numpy(x), torch.from_numpy(y), classes


def test_image_folder_decodes_exact_pixels_in_sorted_order(tmp_path: Path, make_tree: Callable[..., dict]) -> None:
    written = make_tree(tmp_path / "tree", COUNTS)
    train, test = load_image_folder(tmp_path / "tree", shuffle_seed=None, cache=False)
    for split, arrays in (("train", train), ("test", test)):
        x, y, classes = expected_split(written, split)
        assert arrays.classes == classes == ["ant", "bee", "cat"]
        assert arrays.x.dtype == torch.uint8 and arrays.x.shape == (len(y), 3, 5, 6)
        assert torch.equal(arrays.x, x) and torch.equal(arrays.y, y)
    mean, std = arrays_module.channel_stats(train.x)
    assert train.mean == pytest.approx(mean) and test.std == pytest.approx(std)
    ref = train.x.double().div(255)
    assert mean == pytest.approx(ref.mean(dim=(0, 2, 3)).tolist())
    assert std == pytest.approx(ref.std(dim=(0, 2, 3), unbiased=False).tolist())


def test_image_folder_shuffled_order_is_a_fixed_permutation(tmp_path: Path, make_tree: Callable[..., dict]) -> None:
    written = make_tree(tmp_path / "tree", COUNTS)
    train, _ = load_image_folder(tmp_path / "tree", cache=False)
    again, _ = load_image_folder(tmp_path / "tree", cache=False)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    x, y, _ = expected_split(written, "train")
    # Every image appears once, with its own label.
    perm = [next(j for j in range(len(x)) if torch.equal(x[j], img)) for img in train.x]
    assert sorted(perm) == list(range(len(x)))
    assert torch.equal(train.y, y[perm])


def test_image_folder_grey_and_limit(tmp_path: Path, make_tree: Callable[..., dict]) -> None:
    written = make_tree(tmp_path / "grey", COUNTS, size=(7, 7), mode="L")
    train, test = load_image_folder(tmp_path / "grey", shuffle_seed=None, cache=False, limit_per_class=2)
    assert train.x.shape == (6, 1, 7, 7) and test.x.shape == (3, 1, 7, 7)
    assert train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(train.x[2, 0], torch.from_numpy(written[("train", "bee", "000.png")][..., 0]))


def test_image_folder_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_tree: Callable[..., dict]) -> None:
    make_tree(tmp_path / "tree", COUNTS)
    first, first_test = load_image_folder(tmp_path / "tree")
    caches = list(tmp_path.glob("tree.*.npz"))
    assert len(caches) == 1  # default location: next to the tree

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(image_folder_module, "_decode_images", no_decoding)
    second, second_test = load_image_folder(tmp_path / "tree")
    assert torch.equal(first.x, second.x) and torch.equal(first_test.y, second_test.y)
    assert second.classes == first.classes and second.mean == pytest.approx(first.mean)
    # A new file changes the key: the tree is decoded again.
    monkeypatch.undo()
    make_tree(tmp_path / "extra", {("train", "cat"): 1}, seed=5)
    (tmp_path / "extra/train/cat/000.png").rename(tmp_path / "tree/train/cat/zzz.png")
    third, _ = load_image_folder(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert len(third) == len(first) + 1
    assert len(list((tmp_path / "cache").glob("tree.*.npz"))) == 1


def test_image_folder_archive_equals_directory(tmp_path: Path, make_tree: Callable[..., dict]) -> None:
    make_tree(tmp_path / "data/tree", COUNTS)
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "data/tree", arcname="tree")
    from_dir = load_image_folder(tmp_path / "data/tree", cache=False)
    from_tar = load_image_folder(archive, cache_dir=tmp_path / "cache")
    for a, b in zip(from_dir, from_tar):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.classes == b.classes
    assert len(list((tmp_path / "cache").glob("tree.*.npz"))) == 1
    # The parent of a single tree is accepted too.
    assert torch.equal(load_image_folder(tmp_path / "data", cache=False)[0].x, from_dir[0].x)


def test_image_folder_errors(tmp_path: Path, make_tree: Callable[..., dict]) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_image_folder(missing)
    make_tree(tmp_path / "mixed", {("train", "a"): 1, ("test", "a"): 1})
    make_tree(tmp_path / "other", {("train", "a"): 1}, size=(3, 3), seed=2)
    (tmp_path / "other/train/a/000.png").rename(tmp_path / "mixed/train/a/001.png")
    with pytest.raises(ValueError, match="size"):
        load_image_folder(tmp_path / "mixed", cache=False)
    make_tree(tmp_path / "orphan", {("train", "a"): 1, ("test", "b"): 1})
    with pytest.raises(ValueError, match="no train"):
        load_image_folder(tmp_path / "orphan", cache=False)


CIFAR10_JPG = Path(__file__).parents[3].parent / "shared/data/cifar10-jpg.tar.gz"


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.skipif(not CIFAR10_JPG.is_file(), reason=f"{CIFAR10_JPG} not available")
def test_cifar10_jpeg_copy_subset(tmp_path: Path) -> None:
    start = time.perf_counter()
    train, test = load_dataset("cifar10", CIFAR10_JPG, cache_dir=tmp_path, limit_per_class=10)
    assert train.x.shape == (100, 3, 32, 32) and test.x.shape == (100, 3, 32, 32)
    assert train.classes == CIFAR10_CLASSES
    assert train.y.bincount().tolist() == [10] * 10 and test.y.bincount().tolist() == [10] * 10
    assert (train.mean, train.std) == DATASET_STATS["cifar10"]
    pixel_mean = train.x.float().mean() / 255
    assert 0.3 < float(pixel_mean) < 0.65 and float(train.x.float().std()) > 30
    # Second load: from the .npz cache, no decoding.
    t0 = time.perf_counter()
    again, _ = load_image_folder(CIFAR10_JPG, cache_dir=tmp_path, limit_per_class=10)
    assert time.perf_counter() - t0 < 1.0
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    assert again.mean != train.mean  # plain image_folder: statistics of the loaded train images
    assert time.perf_counter() - start < 20
