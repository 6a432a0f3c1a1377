"""Data-parallel training with ``torch.distributed``: DDP wrapping and sharding, over the process group and
reductions of :mod:`applications.common.distributed` (re-exported here).

Launch with ``torchrun --nproc_per_node N ...``. Without a process group everything here is the identity
on a single process, so the trainer is written once.

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

from typing import Any

import torch
from torch import nn

from applications.common.distributed import (
    DeviceError,
    DistContext,
    StoppedElsewhere,
    agree,
    all_gather_object,
    barrier,
    broadcast_object,
    cleanup,
    on_main,
    reduce_mean,
    reduce_sum,
    resolve_device,
    setup,
)

__all__ = [
    "DeviceError",
    "DistContext",
    "StoppedElsewhere",
    "agree",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "cleanup",
    "on_main",
    "reduce_mean",
    "reduce_sum",
    "resolve_device",
    "setup",
    "shard",
    "unwrap",
    "wrap_model",
]


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
