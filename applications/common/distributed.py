"""Processes of a ``torchrun`` launch: the process group from torchrun's environment, reductions, and errors that
stop every rank together.

Launch with ``torchrun --nproc_per_node N ...``; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Without them (or with ``WORLD_SIZE=1``) everything here is the
identity on a single process, so an application is written once.

Errors. Rank 0 speaks for the run: what only rank 0 does (the run directory's lock, checkpoints, records)
runs in :func:`on_main`, what every rank does but may fail on one of them (reading the data) in
:func:`agree`; either way an error is raised on rank 0 as itself and on the other ranks as
:class:`StoppedElsewhere`, which a command turns into its exit status without a message
(:func:`silent_exit_code`, :func:`leave_silently`), so a failure is one line whatever the number of processes. A rank that dies
(killed, out of memory) makes the others' next collective fail with ``torch.distributed.DistError``
(:func:`peer_lost`), or time out after ``timeout_s`` (:func:`setup`): no rank waits forever.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import EXIT_DIVERGED, EXIT_USAGE, Diverged, UserError
from .interrupts import Interrupted

__all__ = [
    "env_int",
    "EXIT_PEER_LOST",
    "REPORT_GRACE_S",
    "DeviceError",
    "DistContext",
    "StoppedElsewhere",
    "agree",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "cleanup",
    "leave_silently",
    "on_main",
    "peer_lost",
    "peer_lost_reason",
    "reduce_mean",
    "reduce_sum",
    "resolve_device",
    "setup",
    "silent_exit_code",
]

T = TypeVar("T")

#: Another process of the run stopped (killed, or failed without a message): this one stops too.
EXIT_PEER_LOST = 4


class DeviceError(UserError, RuntimeError):
    """The requested device is not available on this machine."""


@dataclass
class DistContext:
    """Where this process sits: ``rank`` in ``[0, world_size)``, its GPU index on the node
    (``local_rank``), its ``device``, and whether a process group is in use (``enabled``)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics and logs."""
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` if CUDA is available, else ``cpu``; ``"cuda"`` -> ``cuda:<local_rank>``.

    Raises:
        DeviceError: CUDA is requested but not available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use device=cpu or device=auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def env_int(name: str, default: int) -> int:
    """A torchrun variable read leniently (``default`` when unset or not an integer: joining the process group,
    :func:`setup`, is what names a malformed one); for the command layer, before or without a process group."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str = "auto", timeout_s: Optional[float] = None) -> DistContext:
    """Join the torchrun process group if there is one, else return a single-process context.

    Multi-process when ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set and ``WORLD_SIZE > 1``:
    backend ``nccl`` on CUDA (with ``torch.cuda.set_device(local_rank)``) and ``gloo`` on the CPU,
    rendezvous ``env://`` (``MASTER_ADDR``/``MASTER_PORT``). A process group that is already
    initialized is reused. With torchrun, pass ``"auto"``/``"cuda"``/``"cpu"``: the GPU index comes from
    ``LOCAL_RANK``. ``timeout_s``: how long a collective waits for the other ranks before it fails (``None``:
    torch's default, 30 minutes for gloo, 10 for NCCL).

    Raises:
        ValueError: ``WORLD_SIZE > 1`` but ``RANK``/``LOCAL_RANK`` are missing, or a CUDA index is given
            in a multi-process run.
        RuntimeError: CUDA requested but unavailable, or ``torch.distributed`` unavailable.
    """
    world_size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world_size <= 1:
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank=0, world_size=1, local_rank=local_rank, device=dev, enabled=False)

    missing = [k for k in ("RANK", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {missing} not set; launch with torchrun")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if torch.device(device if device != "auto" else "cpu").index is not None:
        raise ValueError(f"device {device!r}: in a multi-process run pass 'cuda' or 'auto'; the index is LOCAL_RANK")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **timeout)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, enabled=True)


def reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``t`` over ranks (all_reduce on a detached clone; moved to ``ctx.device`` for NCCL and back).

    Identity (returns ``t`` itself) when not enabled. Not differentiable.
    """
    if not ctx.enabled:
        return t
    out = t.detach().to(ctx.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``t`` over ranks (integer tensors give a floating mean). Identity when not enabled."""
    if not ctx.enabled:
        return t
    return reduce_sum(t, ctx) / ctx.world_size


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects). Identity when not enabled."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, ctx: DistContext) -> List[Any]:
    """``[obj_from_rank_0, ..., obj_from_rank_{W-1}]`` on every rank; ``[obj]`` when not enabled.

    Useful for checkpointing per-rank RNG states (each rank draws its own attack initializations).
    """
    if not ctx.enabled:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank. No-op when not enabled."""
    if not ctx.enabled:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group (if this context uses one and it is still alive)."""
    if ctx.enabled and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StoppedElsewhere(Exception):
    """Raised on ranks other than 0 when rank 0 (or :func:`agree`) stops the run: rank 0 reports the error,
    this rank exits with the same ``exit_code`` and says nothing."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"stopped with rank 0 (exit {exit_code})")
        self.exit_code = int(exit_code)


def silent_exit_code(exc: BaseException) -> Optional[int]:
    """The exit status of an error that rank 0 reports for the whole run, so that another rank leaves without a
    message: :class:`StoppedElsewhere`, a user error or divergence that every rank meets alike (a
    configuration read before the process group, a diverged loss of replicated state), an interrupt (torchrun
    signals every rank), a lost peer. ``None`` for anything else (a bug keeps its traceback on every rank)."""
    if isinstance(exc, StoppedElsewhere):
        return exc.exit_code
    if isinstance(exc, Interrupted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 128 + int(signal.SIGINT)
    if isinstance(exc, Diverged):
        return EXIT_DIVERGED
    if isinstance(exc, (UserError, OSError)):
        return EXIT_USAGE
    if peer_lost(exc):
        return EXIT_PEER_LOST
    return None


#: How long a rank other than 0 waits before leaving silently, so that rank 0 reports first (a launcher such as
#: torchrun stops every process as soon as one exits with an error).
REPORT_GRACE_S = 10.0


def leave_silently(exit_code: int, grace_s: float = REPORT_GRACE_S) -> int:
    """``exit_code``, returned after ``grace_s`` seconds in which rank 0 prints the run's one error line and exits
    (the launcher then stops this process, usually well before the grace ends)."""
    try:
        time.sleep(grace_s)
    except (Interrupted, KeyboardInterrupt):  # the launcher stopping this process: what the grace waits for
        pass
    return exit_code


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone (closed its connections or did
    not answer within the process group's timeout): a ``torch.distributed.DistError`` (NCCL), or gloo's plain
    ``RuntimeError`` (its message names its gloo source file)."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc).split("\n")[0])


def peer_lost_reason(exc: BaseException) -> str:
    """The first sentence of a lost peer's error, without gloo's ``[source:line]`` prefix, e.g.
    ``Connection closed by peer [127.0.0.1]:49383``."""
    text = str(exc).strip().split("\n")[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0].rstrip(".")


def _exit_code_of(exc: BaseException) -> int:
    code = silent_exit_code(exc)
    return EXIT_USAGE if code is None else code


def on_main(ctx: DistContext, action: Callable[[], T]) -> T:
    """``action()`` run on rank 0 only, its result broadcast to every rank (picklable results).

    An error of ``action`` (a :class:`~applications.common.errors.UserError`, ``OSError`` or
    :class:`~applications.common.errors.Diverged`) is raised on rank 0 as itself and on the other ranks as
    :class:`StoppedElsewhere` with its exit status. Without a process group: ``action()``.
    """
    if not ctx.enabled:
        return action()
    result: Any = None
    error: Optional[Exception] = None
    if ctx.is_main:
        try:
            result = action()
        except (UserError, OSError, Diverged) as exc:
            error = exc
    result, code = broadcast_object((result, None if error is None else _exit_code_of(error)), ctx)
    if error is not None:
        raise error
    if code is not None:
        raise StoppedElsewhere(code)
    return result


def agree(ctx: DistContext, action: Callable[[], T]) -> T:
    """``action()`` on every rank; if it fails on any (a user error, ``OSError`` or divergence), every rank stops:
    rank 0 raises the error of the lowest failing rank (its message prefixed ``rank r:`` when r > 0, as a
    :class:`~applications.common.errors.UserError`), the others :class:`StoppedElsewhere`. For work that may
    fail on one rank only, such as reading data that one node lacks. Without a process group: ``action()``."""
    if not ctx.enabled:
        return action()
    result: Any = None
    error: Optional[Exception] = None
    try:
        result = action()
    except (UserError, OSError, Diverged) as exc:
        error = exc
    failures = all_gather_object(None if error is None else (_exit_code_of(error), str(error)), ctx)
    first = next(((r, f) for r, f in enumerate(failures) if f is not None), None)
    if first is None:
        return result
    rank, (code, message) = first
    if not ctx.is_main:
        raise StoppedElsewhere(code)
    if rank == 0 and error is not None:
        raise error
    raise (Diverged if code == EXIT_DIVERGED else UserError)(f"rank {rank}: {message}")
