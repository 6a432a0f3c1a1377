"""Oracle tests of the dataset loaders, the splits, the batched augmentation and DeviceLoader."""

from __future__ import annotations

import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from applications.adversarial import data as D
from applications.adversarial.data import (
    DATASET_STATS,
    Augment,
    DeviceLoader,
    ImageArrays,
    crop_flip,
    load_dataset,
    load_digits,
    load_image_folder,
    load_mnist5k,
    load_npz,
    load_torchvision,
    rotate,
    train_val_split,
)

CIFAR10_JPG = Path(__file__).parents[2].parent / "shared/data/cifar10-jpg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def indexed_arrays(n: int = 10, c: int = 1, h: int = 4, w: int = 4) -> ImageArrays:
    """Image i is constant (i % 256) and has label i: batches reveal which images they hold."""
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, c, h, w).contiguous()
    return ImageArrays(x, torch.arange(n), [str(i) for i in range(n)], (0.5,) * c, (0.25,) * c)


# ------------------------------------------------------------------------------------------------
# Offline datasets
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist5k() -> tuple:
    return load_mnist5k()


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
    mean, std = D.channel_stats(train.x)
    assert train.mean == pytest.approx(mean) and train.std == pytest.approx(std)


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------


def make_tree(root: Path, counts: dict, size: tuple = (5, 6), mode: str = "RGB", seed: int = 0) -> dict:
    """Writes random PNGs root/<split>/<class>/<i>.png; returns {(split, class, name): array HWC}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    channels = 3 if mode == "RGB" else 1
    for (split, cls), n in counts.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size[0], size[1], channels), dtype=np.uint8)
            Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(folder / f"{i:03d}.png")
            written[(split, cls, f"{i:03d}.png")] = arr
    return written


COUNTS = {("train", "cat"): 3, ("train", "ant"): 2, ("train", "bee"): 4, ("test", "bee"): 2, ("test", "ant"): 1}


def expected_split(written: dict, split: str) -> tuple:
    keys = sorted(k for k in written if k[0] == split)
    classes = sorted({k[1] for k in written if k[0] == "train"})
    x = np.stack([written[k].transpose(2, 0, 1) for k in keys])
    y = np.array([classes.index(k[1]) for k in keys])
    return torch.from_numpy(x), torch.from_numpy(y), classes


def test_image_folder_decodes_exact_pixels_in_sorted_order(tmp_path: Path) -> None:
    written = make_tree(tmp_path / "tree", COUNTS)
    train, test = load_image_folder(tmp_path / "tree", shuffle_seed=None, cache=False)
    for split, arrays in (("train", train), ("test", test)):
        x, y, classes = expected_split(written, split)
        assert arrays.classes == classes == ["ant", "bee", "cat"]
        assert arrays.x.dtype == torch.uint8 and arrays.x.shape == (len(y), 3, 5, 6)
        assert torch.equal(arrays.x, x) and torch.equal(arrays.y, y)
    mean, std = D.channel_stats(train.x)
    assert train.mean == pytest.approx(mean) and test.std == pytest.approx(std)
    ref = train.x.double().div(255)
    assert mean == pytest.approx(ref.mean(dim=(0, 2, 3)).tolist())
    assert std == pytest.approx(ref.std(dim=(0, 2, 3), unbiased=False).tolist())


def test_image_folder_shuffled_order_is_a_fixed_permutation(tmp_path: Path) -> None:
    written = make_tree(tmp_path / "tree", COUNTS)
    train, _ = load_image_folder(tmp_path / "tree", cache=False)
    again, _ = load_image_folder(tmp_path / "tree", cache=False)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    x, y, _ = expected_split(written, "train")
    # Every image appears once, with its own label.
    perm = [next(j for j in range(len(x)) if torch.equal(x[j], img)) for img in train.x]
    assert sorted(perm) == list(range(len(x)))
    assert torch.equal(train.y, y[perm])


def test_image_folder_grey_and_limit(tmp_path: Path) -> None:
    written = make_tree(tmp_path / "grey", COUNTS, size=(7, 7), mode="L")
    train, test = load_image_folder(tmp_path / "grey", shuffle_seed=None, cache=False, limit_per_class=2)
    assert train.x.shape == (6, 1, 7, 7) and test.x.shape == (3, 1, 7, 7)
    assert train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(train.x[2, 0], torch.from_numpy(written[("train", "bee", "000.png")][..., 0]))


def test_image_folder_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "tree", COUNTS)
    first, first_test = load_image_folder(tmp_path / "tree")
    caches = list(tmp_path.glob("tree.*.npz"))
    assert len(caches) == 1  # default location: next to the tree

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(D, "_decode_images", no_decoding)
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


def test_image_folder_archive_equals_directory(tmp_path: Path) -> None:
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


def test_image_folder_errors(tmp_path: Path) -> None:
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


# ------------------------------------------------------------------------------------------------
# npz, torchvision, front door
# ------------------------------------------------------------------------------------------------


def test_load_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_nhwc = rng.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nhwc.npz", x_train=x_nhwc, y_train=y, x_test=x_nhwc[:2], y_test=y[:2])
    train, test = load_npz(tmp_path / "nhwc.npz")
    assert torch.equal(train.x, torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)))
    assert train.y.tolist() == y.tolist() and train.classes == ["0", "1", "2"] and len(test) == 2

    x_float = x_nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.savez(tmp_path / "nchw.npz", x_train=x_float, y_train=y[:, None], x_test=x_float, y_test=y)
    f_train, _ = load_npz(tmp_path / "nchw.npz", classes=["a", "b", "c"], mean=(0.5,) * 3, std=(0.2,) * 3)
    assert torch.equal(f_train.x, train.x) and f_train.classes == ["a", "b", "c"] and f_train.mean == (0.5,) * 3

    grey = rng.integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x_train=grey, y_train=y[:4], x_test=grey, y_test=y[:4])
    g_train, _ = load_npz(tmp_path / "grey.npz")
    assert g_train.x.shape == (4, 1, 8, 8) and torch.equal(g_train.x[:, 0], torch.from_numpy(grey))

    square = rng.integers(0, 256, size=(2, 3, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "ambiguous.npz", x_train=square, y_train=y[:2], x_test=square, y_test=y[:2])
    with pytest.raises(ValueError, match="layout"):
        load_npz(tmp_path / "ambiguous.npz")
    assert load_npz(tmp_path / "ambiguous.npz", layout="NHWC")[0].x.shape == (2, 3, 3, 5)

    np.savez(tmp_path / "bad.npz", x_train=x_float * 255, y_train=y, x_test=x_float, y_test=y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "bad.npz")


def test_load_dataset_front_door(tmp_path: Path, mnist5k: tuple) -> None:
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
    make_tree(tmp_path / "tree", COUNTS)
    folder_train, _ = load_dataset("image-folder", tmp_path / "tree", limit_per_class=1, cache_dir=tmp_path / "c")
    assert len(folder_train) == 3
    as_cifar, _ = load_dataset("cifar100", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert (as_cifar.mean, as_cifar.std) == DATASET_STATS["cifar100"]


def test_load_torchvision_without_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"bilevel\[vision\]"):
        load_torchvision("cifar10", tmp_path)
    with pytest.raises(ImportError, match=r"bilevel\[vision\]"):
        load_dataset("cifar10", tmp_path)


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def test_train_val_split_last_and_seeded() -> None:
    arrays = indexed_arrays(50)
    train, val = train_val_split(arrays, 5)
    assert train.y.tolist() == list(range(45)) and val.y.tolist() == list(range(45, 50))
    assert torch.equal(val.x, arrays.x[45:]) and val.classes == arrays.classes and val.mean == arrays.mean
    s_train, s_val = train_val_split(arrays, 5, seed=3)
    assert sorted(s_train.y.tolist() + s_val.y.tolist()) == list(range(50)) and len(s_val) == 5
    assert s_val.y.tolist() == sorted(s_val.y.tolist()) and s_val.y.tolist() != list(range(45, 50))
    assert torch.equal(train_val_split(arrays, 5, seed=3)[1].y, s_val.y)
    with pytest.raises(ValueError):
        train_val_split(arrays, 50)


def test_train_val_split_warns_on_class_sorted_data() -> None:
    arrays = ImageArrays(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20) // 10, ["a", "b"])
    with pytest.warns(UserWarning, match="no image of classes"):
        train_val_split(arrays, 5)


# ------------------------------------------------------------------------------------------------
# Batched augmentation
# ------------------------------------------------------------------------------------------------


def reference_crop_flip(x: torch.Tensor, p: int, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-sample loop: zero-pad, crop, flip (torchvision RandomCrop + RandomHorizontalFlip)."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        padded = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=x.dtype)
        padded[:, p : p + h, p : p + w] = x[i]
        crop = padded[:, int(oy[i]) : int(oy[i]) + h, int(ox[i]) : int(ox[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out


def test_crop_flip_identity_and_flip() -> None:
    x = torch.rand(6, 3, 5, 7)
    p = 4
    centre = torch.full((6,), p)
    no_flip = torch.zeros(6, dtype=torch.bool)
    assert torch.equal(crop_flip(x, p, centre, centre, no_flip), x)
    chosen = torch.tensor([True, False, True, True, False, False])
    out = crop_flip(x, p, centre, centre, chosen)
    assert torch.equal(out[chosen], torch.flip(x[chosen], dims=[3])) and torch.equal(out[~chosen], x[~chosen])


def test_crop_flip_matches_per_sample_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.uint8):
        x = torch.randint(1, 256, (16, 3, 6, 9), generator=gen).to(dtype)
        p = 3
        oy, ox = torch.randint(0, 2 * p + 1, (2, 16), generator=gen)
        flip = torch.rand(16, generator=gen) < 0.5
        out = crop_flip(x, p, oy, ox, flip)
        assert torch.equal(out, reference_crop_flip(x, p, oy, ox, flip))
    # Exact translation with zero fill: shift down 2, right 1 (offsets p - 2, p - 1), no flip.
    x = torch.rand(1, 1, 6, 6) + 1
    shifted = crop_flip(x, 3, torch.tensor([1]), torch.tensor([2]), torch.tensor([False]))
    assert torch.equal(shifted[0, 0, 2:, 1:], x[0, 0, :-2, :-1])
    assert (shifted[0, 0, :2] == 0).all() and (shifted[0, 0, :, :1] == 0).all()


def test_rotate_exact_cases() -> None:
    x = torch.rand(4, 2, 8, 8)
    assert torch.equal(rotate(x, torch.zeros(4)), x)
    assert torch.equal(rotate(x, torch.full((4,), 90.0)), torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise
    assert torch.equal(rotate(x, torch.full((4,), -90.0)), torch.rot90(x, -1, dims=(2, 3)))
    rect = torch.rand(2, 1, 4, 6)
    assert torch.equal(rotate(rect, torch.tensor([180.0, 0.0])), torch.stack([rect[0].flip(1, 2), rect[1]]))
    # Rotating by 45 degrees leaves the corners empty (zero fill) and keeps the centre.
    ones = torch.ones(1, 1, 9, 9)
    r = rotate(ones, torch.tensor([45.0]))
    assert r[0, 0, 0, 0] == 0 and r[0, 0, 4, 4] == 1


def test_augment_reproduces_its_random_draws() -> None:
    x = torch.rand(8, 3, 10, 10)
    aug = Augment(crop_padding=4, flip=True, rotation=15.0)
    out = aug(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    oy, ox = torch.randint(0, 9, (2, 8), generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    angles = (2 * torch.rand(8, generator=g) - 1) * 15.0
    assert angles.abs().max() <= 15.0
    assert torch.equal(out, rotate(crop_flip(x, 4, oy, ox, flip), angles))
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(8)))
    assert torch.equal(Augment()(x, g), x)


def test_augment_presets() -> None:
    assert Augment.for_dataset("cifar10") == Augment(crop_padding=4, flip=True)
    assert Augment.for_dataset("CIFAR-100") == Augment(crop_padding=4, flip=True, rotation=15.0)
    assert Augment.for_dataset("svhn") is None and Augment.for_dataset("mnist5k") is None


# ------------------------------------------------------------------------------------------------
# DeviceLoader
# ------------------------------------------------------------------------------------------------


def test_device_loader_in_order_without_shuffle() -> None:
    arrays = indexed_arrays(10)
    loader = DeviceLoader(arrays, 4, shuffle=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [4, 4, 2]
    xs = torch.cat([x for x, _ in batches])
    assert xs.dtype == torch.float32 and torch.equal(xs, arrays.x.float() / 255)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    assert len(DeviceLoader(arrays, 4, drop_last=True)) == 2 == len(list(DeviceLoader(arrays, 4, drop_last=True)))


def test_device_loader_shuffle_is_seeded_permutation() -> None:
    arrays = indexed_arrays(23)

    def epoch(loader: DeviceLoader) -> list:
        return [(x.clone(), y.clone()) for x, y in loader]

    a = DeviceLoader(arrays, 5, seed=1, augment=Augment(crop_padding=1, flip=True))
    first, second = epoch(a), epoch(a)
    ys = torch.cat([y for _, y in first])
    assert sorted(ys.tolist()) == list(range(23)) and ys.tolist() != list(range(23))
    assert torch.cat([y for _, y in second]).tolist() != ys.tolist()  # a new permutation each pass
    for x, y in first:  # images still belong to their labels (crop keeps the constant centre)
        assert torch.equal(x[:, :, 1:3, 1:3], (y % 256).float().div(255).view(-1, 1, 1, 1).expand(-1, 1, 2, 2))
    b = DeviceLoader(arrays, 5, seed=1, augment=Augment(crop_padding=1, flip=True))
    for (xa, ya), (xb, yb) in zip(first + second, epoch(b) + epoch(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.cat([y for _, y in DeviceLoader(arrays, 5, seed=2)]).tolist() != ys.tolist()


def test_device_loader_generator_state_resumes() -> None:
    arrays = indexed_arrays(12)
    loader = DeviceLoader(arrays, 4, seed=0, augment=Augment(crop_padding=2, flip=True))
    list(loader)
    state = loader.generator.get_state()
    expected = [(x.clone(), y.clone()) for x, y in loader]
    resumed = DeviceLoader(arrays, 4, seed=123, augment=Augment(crop_padding=2, flip=True))
    resumed.generator.set_state(state)
    for (xa, ya), (xb, yb) in zip(expected, resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_device_loader_channels_last_and_device() -> None:
    arrays = indexed_arrays(6, c=3)
    loader = DeviceLoader(arrays, 3, device="cpu", channels_last=True)
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.device.type == "cpu"
    assert y.dtype == torch.int64 and loader.generator.device.type == "cpu"
