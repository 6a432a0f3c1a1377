"""Crash-safe checkpoints: atomic writes, safe loads, RNG state, and a compatibility check for resuming.

A checkpoint is a ``dict`` of tensors and plain Python values (ints, floats, str, lists, tuples, dicts,
None), so that it loads with ``torch.load(weights_only=True)`` and never executes pickled code.

Atomicity. :func:`save_atomic` writes to a temporary file in the destination directory, flushes and
``fsync``\\ s it, renames it onto the destination with ``os.replace`` (atomic on POSIX and Windows when
both names are on the same file system) and ``fsync``\\ s the directory so that the rename itself is
durable. A process killed at any instant therefore leaves either the previous complete file or the new
complete file under ``path``, never a truncated one; at worst a stray ``.<name>.<pid>.<hex>.tmp`` file
remains, which :func:`remove_stale_temporaries` deletes once its writer is gone.

A failed write (a full disk, a read-only or vanished directory) raises :class:`OSError` with the errno
of the underlying failure and the checkpoint's path, even where ``torch.save`` reports it as a
``RuntimeError`` of its zip writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "MODEL_DEFINING_KEYS",
    "capture_rng_state",
    "check_compatible",
    "load",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(Exception):
    """A checkpoint that cannot be used: corrupt, truncated, of the wrong type, or from another setting."""


# --------------------------------------------------------------------------------------------- save / load
def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # Windows, or file systems that refuse to open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Dict[str, Any], path: PathLike) -> None:
    """Write ``obj`` to ``path`` with ``torch.save`` so that ``path`` is always a complete file.

    Steps: ``torch.save`` into ``<dir>/.<name>.<random>.tmp`` (created exclusively, with the usual
    umask-derived permissions), flush, ``os.fsync``, ``os.replace`` onto ``path``, ``fsync`` the directory.
    The temporary file is removed if anything fails (including ``KeyboardInterrupt``). The parent
    directory is created if missing.

    Raises:
        TypeError: ``obj`` is not a dict.
        OSError: the file cannot be written (errno of the cause; the message names ``path``).
    """
    if not isinstance(obj, dict):
        raise TypeError(f"save_atomic expects a dict checkpoint, got {type(obj).__name__}")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        raise OSError(err.errno, f"cannot write checkpoint {path}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(err)
        if cause is not None:
            raise OSError(cause.errno, f"cannot write checkpoint {path}: {cause.strerror or cause}") from err
        raise
    _fsync_directory(directory)


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError that ``err`` is or was raised while handling (torch's zip writer wraps it)."""
    seen = 0
    e: Optional[BaseException] = err
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (or the platform cannot tell): keep its file
        return True
    return True


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Deletes the ``.<name>.<pid>.<hex>.tmp`` files that :func:`save_atomic` left in ``directory`` when
    its process was killed mid-write (those whose process no longer runs); returns their paths."""
    directory = Path(directory)
    removed: List[Path] = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group("pid"))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def load(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        CheckpointError: the file is truncated or corrupt, holds objects that ``weights_only`` refuses,
            or its payload is not a dict (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip reader errors, EOFError, UnpicklingError, ...
        raise CheckpointError(f"cannot load checkpoint {path} (truncated, corrupt or not weights-only): {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


# ----------------------------------------------------------------------------------------------- RNG state
def capture_rng_state(*, cuda_devices: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The state of every random generator a training step may touch, in weights-only-loadable form.

    Keys: ``python`` (``random.getstate()``: version int, the 625 Mersenne-Twister words as an int64
    tensor, the cached Gaussian or None), ``numpy`` (the legacy global ``np.random`` state with its
    624-word key as an int64 tensor), ``torch`` (CPU generator, uint8 tensor) and ``cuda`` (a dict
    ``{device index: uint8 tensor}``; empty without CUDA).

    Args:
        cuda_devices: CUDA device indices to capture; None = every visible device. In a multi-GPU
            process group pass ``[ctx.device.index]``: reading a device's generator creates a CUDA
            context on it, so "all" from every rank would put a context of every rank on every GPU.
    """
    version, words, gauss = random.getstate()
    algo, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # noqa: NPY002 (the global RNG is what we save)
    cuda: Dict[int, torch.Tensor] = {}
    if torch.cuda.is_available():
        indices = range(torch.cuda.device_count()) if cuda_devices is None else cuda_devices
        cuda = {int(i): torch.cuda.get_rng_state(int(i)).clone() for i in indices}
    return {
        "python": (int(version), torch.tensor(words, dtype=torch.int64), None if gauss is None else float(gauss)),
        "numpy": (str(algo), torch.from_numpy(np.asarray(key, dtype=np.int64).copy()), int(pos), int(has_gauss),
                  float(cached_gaussian)),
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators from :func:`capture_rng_state` so that the next draws repeat exactly.

    Each saved CUDA state is restored on the device with the same index when that device is visible;
    the others are ignored (resuming a GPU run on the CPU or on fewer GPUs), since no draw on the
    remaining devices depends on them.

    Raises:
        CheckpointError: a required key (python, numpy, torch) is missing or malformed.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise CheckpointError(f"RNG state lacks {missing}; expected the dict from capture_rng_state()")
    try:
        version, words, gauss = state["python"]
        random.setstate((int(version), tuple(int(w) for w in torch.as_tensor(words).tolist()), gauss))
        algo, key, pos, has_gauss, cached_gaussian = state["numpy"]
        key_np = torch.as_tensor(key).cpu().numpy().astype(np.uint32)
        np.random.set_state((str(algo), key_np, int(pos), int(has_gauss), float(cached_gaussian)))  # noqa: NPY002
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"malformed RNG state: {err}") from err
    cuda = state.get("cuda") or {}
    if isinstance(cuda, (list, tuple)):
        cuda = dict(enumerate(cuda))
    if cuda and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        for i, s in cuda.items():
            if 0 <= int(i) < visible:
                torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), device=int(i))


# ------------------------------------------------------------------------------------------- compatibility
#: Exact dotted keys (besides everything under ``model``) that must match to resume a run.
MODEL_DEFINING_KEYS: Tuple[str, ...] = ("data.name", "method.name", "method.eps")

class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _as_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; non-dict leaves (lists included) are kept whole."""
    tree = _as_dict(tree)
    if isinstance(tree, Mapping):
        out: Dict[str, Any] = {}
        if not tree and prefix:
            out[prefix] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12) or (
            math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def check_compatible(saved_config: Mapping[str, Any], config: Mapping[str, Any], *,
                     extra_keys: Iterable[str] = ()) -> None:
    """Refuse to resume a checkpoint written for a different model or problem.

    Compared: every key under ``model`` (nested keys included) and the dotted keys
    :data:`MODEL_DEFINING_KEYS` (``data.name``, ``method.name``, ``method.eps``), plus ``extra_keys``.
    Everything else (epochs, learning rate, output directory, ...) may differ. Numbers compare with a
    relative tolerance of 1e-9 (so ``8/255`` written by YAML and Python agree); lists equal tuples.

    Raises:
        CheckpointError: one message listing every differing key as ``key: saved=... new=...``.
    """
    saved, new = _flatten(saved_config), _flatten(config)
    exact = set(MODEL_DEFINING_KEYS) | set(extra_keys)

    def defining(key: str) -> bool:
        return key == "model" or key.startswith("model.") or key in exact

    keys = sorted(k for k in set(saved) | set(new) if defining(k))
    diffs = []
    for k in keys:
        a, b = saved.get(k, _MISSING), new.get(k, _MISSING)
        if a is _MISSING or b is _MISSING or not _same(a, b):
            diffs.append(f"{k}: saved={a!r} new={b!r}")
    if diffs:
        raise CheckpointError("checkpoint is incompatible with this config (model/problem keys differ): "
                              + "; ".join(diffs))
