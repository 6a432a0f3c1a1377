"""Crash-safe checkpoints: atomic writes, safe loads, RNG state, and a compatibility check for resuming.

A checkpoint is a ``dict`` of tensors and plain Python values (ints, floats, str, lists, tuples, dicts,
None), so that it loads with ``torch.load(weights_only=True)`` and never executes pickled code.

Atomicity. :func:`save_atomic` writes through :func:`~applications.common.atomic.write_atomic`: a process
killed at any instant leaves either the previous complete file or the new one under ``path``, never a
truncated one; at worst a stray ``.<name>.<pid>.<hex>.tmp`` file remains, which
:func:`~applications.common.atomic.remove_stale_temporaries` deletes once its writer is gone.

Kinds. Every application writes :data:`RUN_KIND_KEY` into its checkpoints, so that one given to the other
application's command is named for what it is (:func:`check_run_kind`).

A failed write (a full disk, a read-only or vanished directory) raises :class:`OSError` with the errno
of the underlying failure and the checkpoint's path, even where ``torch.save`` reports it as a
``RuntimeError`` of its zip writer.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .atomic import PathLike, write_atomic
from .errors import UserError

__all__ = [
    "CheckpointError",
    "MODEL_DEFINING_KEYS",
    "capture_rng_state",
    "check_compatible",
    "differences",
    "load",
    "RUN_KINDS",
    "RUN_KIND_KEY",
    "check_run_kind",
    "run_kind",
    "restore_rng_state",
    "save_atomic",
]


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, truncated, of the wrong type, or from another setting."""


# --------------------------------------------------------------------------------------------- save / load
def save_atomic(obj: Dict[str, Any], path: PathLike) -> None:
    """Write ``obj`` to ``path`` with ``torch.save`` so that ``path`` is always a complete file
    (:func:`~applications.common.atomic.write_atomic`: a per-process temporary, ``fsync``, rename).

    Raises:
        TypeError: ``obj`` is not a dict.
        OSError: the file cannot be written (errno of the cause; the message names ``path``).
    """
    if not isinstance(obj, dict):
        raise TypeError(f"save_atomic expects a dict checkpoint, got {type(obj).__name__}")
    write_atomic(path, lambda f: torch.save(obj, f), "checkpoint")


# ---------------------------------------------------------------------------------------------- run kinds
#: The kinds of run whose checkpoints carry their kind under :data:`RUN_KIND_KEY`, with their names.
RUN_KINDS = {"adversarial-training": "an adversarial-training (bilevel-train) checkpoint",
             "datacleaning": "a data-cleaning (bilevel-datacleaning) checkpoint"}
#: The key of a checkpoint that names the kind of run that wrote it.
RUN_KIND_KEY = "run_kind"


def run_kind(ck: Mapping[str, Any]) -> Optional[str]:
    """The kind of run that wrote checkpoint ``ck``: its :data:`RUN_KIND_KEY`, or for files written before
    the key existed, the kind their layout shows (None: neither)."""
    kind = ck.get(RUN_KIND_KEY)
    if isinstance(kind, str):
        return kind
    if "runs" in ck and "baselines" in ck:
        return "datacleaning"
    if "format" in ck and ck.get("kind") in ("last", "best"):
        return "adversarial-training"
    return None


def check_run_kind(ck: Mapping[str, Any], expected: str, path: PathLike) -> None:
    """Refuse a checkpoint that another kind of run (or no run of this project) wrote.

    Raises:
        CheckpointError: naming what ``path`` is, e.g. "... is a data-cleaning (bilevel-datacleaning)
            checkpoint, not an adversarial-training (bilevel-train) one".
    """
    kind = run_kind(ck)
    if kind == expected:
        return
    want = RUN_KINDS.get(expected, expected).replace(" checkpoint", " one")
    if kind is None:
        raise CheckpointError(f"{path} was not written by a run of this project (no run kind); expected {want}")
    raise CheckpointError(f"{path} is {RUN_KINDS.get(kind, repr(kind))}, not {want}")


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
        raise CheckpointError(f"cannot load checkpoint {path} (truncated, corrupt or not weights-only): "
                              f"{_load_failure(err, path)}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _load_failure(err: Exception, path: Path) -> str:
    """torch.load's reason in one line, without its advice to retry with ``weights_only=False`` (which would run
    whatever code the file holds)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # keep the unpickler's own reason, drop the advice around it
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return f"not a weights-only checkpoint ({text}); do not load it with weights_only=False unless you trust it"
    if isinstance(err, EOFError) or path.stat().st_size == 0:
        return "the file ends early (empty or truncated)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not readable as a torch checkpoint ({type(err).__name__}{': ' + first if first else ''})"


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


def differences(saved_config: Any, config: Any, keys: Optional[Callable[[str], bool]] = None,
                missing: Any = _MISSING) -> List[Tuple[str, Any, Any]]:
    """The dotted keys (those for which ``keys(key)`` holds; default all) whose values differ between two
    nested configs, sorted, as ``(key, saved, new)``; an absent key is ``missing`` (default ``<missing>``). Numbers compare with
    a relative tolerance of 1e-9 (so ``8/255`` written by YAML and Python agree); lists equal tuples."""
    saved, new = _flatten(saved_config), _flatten(config)
    out = []
    for k in sorted(set(saved) | set(new)):
        if keys is not None and not keys(k):
            continue
        a, b = saved.get(k, _MISSING), new.get(k, _MISSING)
        if a is _MISSING or b is _MISSING or not _same(a, b):
            out.append((k, missing if a is _MISSING else a, missing if b is _MISSING else b))
    return out


def check_compatible(saved_config: Mapping[str, Any], config: Mapping[str, Any], *,
                     extra_keys: Iterable[str] = (), fix: str = "") -> None:
    """Refuse to resume a checkpoint written for a different model or problem.

    Compared: every key under ``model`` (nested keys included) and the dotted keys
    :data:`MODEL_DEFINING_KEYS` (``data.name``, ``method.name``, ``method.eps``), plus ``extra_keys``
    (a key, or a section whose every key counts). Everything else (epochs, learning rate, output
    directory, ...) may differ (:func:`differences` says how numbers compare).

    Raises:
        CheckpointError: one message listing every differing key as ``key: saved=... new=...``, then ``fix``
            (how to start afresh).
    """
    exact = set(MODEL_DEFINING_KEYS) | set(extra_keys)

    def defining(key: str) -> bool:
        return key == "model" or key.startswith("model.") or key in exact or any(key.startswith(f"{e}.") for e in exact)

    diffs = [f"{k}: saved={a!r} new={b!r}" for k, a, b in differences(saved_config, config, defining)]
    if diffs:
        raise CheckpointError("checkpoint is incompatible with this config (model/problem keys differ): "
                              + "; ".join(diffs) + (f"; {fix}" if fix else ""))
