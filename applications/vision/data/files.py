"""Datasets stored as arrays: an .npz file, or CIFAR-10/100 and SVHN through torchvision (optional)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .arrays import DATASET_STATS, ImageArrays, PathLike, channel_stats, with_stats
from .errors import DataError

__all__ = ["load_npz", "load_torchvision"]


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
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds one array, expected an .npz with x_train, y_train, x_test, y_test")
    with archive as f:
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
    return with_stats((train, test), mean, std)



def load_torchvision(name: str, root: PathLike, download: bool = True) -> Tuple[ImageArrays, ImageArrays]:
    """CIFAR-10, CIFAR-100 or SVHN through torchvision (downloaded into ``root`` if asked).

    Needs the optional extra: ``pip install bilevel[vision]``. Returns (train, test) with the
    official Fast-BAT normalization constants of :data:`DATASET_STATS`.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ("cifar10", "cifar100", "svhn"):
        raise ValueError(f"load_torchvision: unknown dataset {name!r}; valid: cifar10, cifar100, svhn")
    root = Path(root).expanduser()
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        where = (f"{root} does not exist; give an image folder, a .tar/.tar.gz archive of one or an .npz, or "
                 if not root.exists() else f"{root} is not an image folder, archive or .npz; ")
        raise ImportError(f"dataset {name!r}: {where}downloading it needs torchvision, which is not installed "
                          "(`pip install bilevel[vision]`)") from err
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

