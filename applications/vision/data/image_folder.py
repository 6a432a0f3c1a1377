"""``train/<class>/*`` + ``test/<class>/*`` image trees (a directory or a tar archive of one), decoded
once with Pillow and cached as .npz."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .arrays import ImageArrays, PathLike, channel_stats, with_stats
from .errors import DataError

__all__ = ["ARCHIVE_SUFFIXES", "default_cache_dir", "is_image_folder", "load_image_folder"]

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
#: File-name endings of the archives an image folder may come in.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$BILEVEL_CACHE`` or ``$XDG_CACHE_HOME/bilevel`` (``~/.cache/bilevel``): where decoded
    arrays go when the data's own directory is read-only."""
    if os.environ.get("BILEVEL_CACHE"):
        return Path(os.environ["BILEVEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bilevel"


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_image_folder(path: Path) -> bool:
    """True if ``path`` is an archive of an image-folder tree, or a directory holding one."""
    return _is_archive(path) or (path.is_dir() and _find_tree(path) is not None)


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
    try:
        return _read_archive(archive)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        detail = " ".join(str(err).split())  # tarfile lists every method it tried, one per line
        raise DataError(f"{archive}: truncated or corrupt archive ({type(err).__name__}: {detail}); "
                        "download or create it again") from err


def _read_archive(archive: Path) -> List[_Entry]:
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

    def read(i: int) -> Image.Image:
        src = sources[i]
        try:
            data = src.read_bytes() if isinstance(src, Path) else src
            image = Image.open(io.BytesIO(data))
            image.load()
        except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"{names[i]}: cannot decode the image ({err}); delete or replace the file") from err
        return image

    first = read(0)
    mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    height, width = first.height, first.width
    channels = 1 if mode == "L" else 3
    out = np.empty((len(sources), height, width, channels), dtype=np.uint8)

    def decode(i: int) -> None:
        image = read(i).convert(mode)
        if image.size != (width, height):
            raise DataError(f"{names[i]}: size {image.size}, expected {(width, height)} like {names[0]}")
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
            return with_stats(cached, mean, std)

    if tree is None:
        entries = _list_archive(root)
    classes, by_split = _select(entries, limit_per_class)
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        by_split = {s: [chosen[i] for i in rng.permutation(len(chosen))] for s, chosen in by_split.items()}
    workers = num_workers or os.cpu_count() or 1
    index = {c: k for k, c in enumerate(classes)}
    arrays = {}
    where = f"{tree}/" if tree is not None else f"{root}:"
    for split, chosen in by_split.items():
        names = [f"{where}{split}/{e[1]}/{e[2]}" for e in chosen]
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
    return with_stats((train, test), mean, std)


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

