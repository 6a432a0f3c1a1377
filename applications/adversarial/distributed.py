"""Data-parallel training with ``torch.distributed``: process-group setup, DDP wrapping, sharding, reductions.

Launch with ``torchrun --nproc_per_node N ...``; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Without them (or with ``WORLD_SIZE=1``) everything here is the
identity on a single process, so the trainer is written once.

What DDP computes. Each rank r holds a batch B_r and calls ``loss_r.backward()``; DDP all-reduces the
parameter gradients and divides by the world size W, so every rank ends with

.. math::  \\bar g = \\frac{1}{W} \\sum_r \\nabla_\\theta \\ell_r(\\theta),

the gradient of the mean of the per-rank (mean-reduced) losses, i.e. the single-process gradient of the
global batch of size ``W * len(B_r)`` when batches have equal sizes (see :func:`shard`).

Bi-level losses: every attack pass runs through the UNWRAPPED module (:func:`unwrap`) and only the
training forward through the wrapper; why, and what the one backward then averages, is in
:mod:`applications.adversarial.methods` (checked in ``tests/adversarial/test_distributed.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn

from applications.common.errors import UserError

__all__ = [
    "DeviceError",
    "DistContext",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "cleanup",
    "reduce_mean",
    "reduce_sum",
    "resolve_device",
    "setup",
    "shard",
    "unwrap",
    "wrap_model",
]


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


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group if there is one, else return a single-process context.

    Multi-process when ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set and ``WORLD_SIZE > 1``:
    backend ``nccl`` on CUDA (with ``torch.cuda.set_device(local_rank)``) and ``gloo`` on the CPU,
    rendezvous ``env://`` (``MASTER_ADDR``/``MASTER_PORT``). A process group that is already
    initialized is reused. With torchrun, pass ``"auto"``/``"cuda"``/``"cpu"``: the GPU index comes from
    ``LOCAL_RANK``.

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
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, enabled=True)


def wrap_model(model: nn.Module, ctx: DistContext, *, sync_batchnorm: bool = False, sync_buffers: bool = True,
               **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when ``ctx.enabled`` (``device_ids=[index]`` on CUDA), else ``model``.

    ``model`` must already be on ``ctx.device``. ``sync_batchnorm=True`` converts BatchNorm layers to
    ``SyncBatchNorm`` first (batch statistics over the global batch; CUDA only). ``sync_buffers=False``:
    every forward keeps the rank's own buffers (BatchNorm running statistics) instead of rank 0's,
    through ``forward_sync_buffers=False`` where DDP has it (it deprecates ``broadcast_buffers``, with
    a warning on every rank), else ``broadcast_buffers=False``; the buffers are still equal at
    construction. Other keyword arguments go to DDP, e.g. ``find_unused_parameters=True``.
    """
    if not ctx.enabled:
        return model
    if not sync_buffers:
        import inspect

        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        ddp_kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
        ddp_kwargs.setdefault("output_device", ctx.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def shard(indices: torch.Tensor, ctx: DistContext, *, drop_remainder: bool = True) -> torch.Tensor:
    """This rank's part of a global index permutation: STRIDED, ``indices[rank : n : world_size]``.

    With ``drop_remainder=True`` (training) the last ``len(indices) % world_size`` entries are dropped
    first, so every rank gets exactly ``len(indices) // world_size`` indices and runs the same number of
    steps (an uneven step count deadlocks DDP). Striding (as ``DistributedSampler`` does) has a useful
    property: if rank r takes local batch j as ``shard[j*B:(j+1)*B]``, the union over ranks of batch j is
    exactly ``indices[j*B*W:(j+1)*B*W]``, the single-process batch of size ``B*W``. All ranks must pass
    the SAME permutation (same seed, or :func:`broadcast_object`). With ``drop_remainder=False``
    (evaluation) shards differ by at most one element and together cover every index once.

    Raises:
        ValueError: ``indices`` is not 1-D, or (with ``drop_remainder``) has fewer entries than ranks.
    """
    if indices.dim() != 1:
        raise ValueError(f"shard expects a 1-D index tensor, got shape {tuple(indices.shape)}")
    if not ctx.enabled or ctx.world_size == 1:
        return indices
    n = indices.numel()
    if drop_remainder:
        per_rank = n // ctx.world_size
        if per_rank == 0:
            raise ValueError(f"cannot shard {n} indices over {ctx.world_size} ranks with drop_remainder=True")
        n = per_rank * ctx.world_size
    return indices[ctx.rank:n:ctx.world_size]


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
