r"""Data-parallel estimates: every mini-batch quantity averaged over the ranks of a ``torch.distributed`` group.

With :math:`P` processes, rank :math:`r` draws its own batch :math:`B_r` of size :math:`b` and computes each
estimate (a lower gradient, a Hessian-vector or cross product, the upper gradients) on it; the method
then uses the average over ranks,

.. math:: \frac{1}{P}\sum_{r=1}^{P} \frac{1}{b}\sum_{i \in B_r} \nabla \ell_i
          = \frac{1}{Pb} \sum_{i \in B_1 \cup \dots \cup B_P} \nabla \ell_i,

which is the estimate one process computes on the concatenated batch of size :math:`Pb`, for objectives that
are means over their batch. The same holds for per-sample upper variables (data weights :math:`w_i`): the
average over ranks gives :math:`w_i` the gradient :math:`\frac{1}{Pb}\nabla_{w_i}\ell_i` of the concatenated
batch's mean (the other ranks contribute zero), so averaging is right there too, not summing. Each
estimate is one ``all_reduce`` (tensors of one quantity are packed into a single buffer); the one-process
path (``parallel=None``) is unchanged and communicates nothing.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DataParallel", "mean_over"]


class DataParallel:
    """Average estimates over the ranks of ``group`` (the default process group if ``None``).

    Pass it as ``parallel=`` to :class:`~bilevel.TorchOptim`, the stochastic implicit strategies
    (:class:`~bilevel.AmIGO`, :class:`~bilevel.StocBiO`), the single-loop methods (:class:`~bilevel.SOBA`,
    :class:`~bilevel.F2SA`, :class:`~bilevel.BOME`) and :class:`~bilevel.RandomBatches` (which then returns
    the rank's share of one global draw). ``torch.distributed`` must be initialized first (``torchrun`` and
    ``dist.init_process_group``).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallel: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group (torchrun sets the environment) first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size})"

    def mean(self, tensors: Sequence[torch.Tensor], *, differentiable: bool = False) -> List[torch.Tensor]:
        """The average over ranks of each tensor (one ``all_reduce`` of a packed buffer; inputs are not modified).

        ``differentiable=True`` keeps the autograd graph (the all-reduce's backward sums the cotangents over
        ranks, itself differentiably): for estimates inside a graph that is differentiated later, such as
        the unrolled steps of :class:`~bilevel.SGD`.
        """
        tensors = list(tensors)
        if not tensors:
            return []
        if self.world_size == 1:
            return tensors
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            return [self.mean([t], differentiable=differentiable)[0] for t in tensors]
        if differentiable:
            flat = _AllReduceSum.apply(torch.cat([t.reshape(-1) for t in tensors]), self.group)
        else:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat = flat / self.world_size
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
        return out


class _AllReduceSum(torch.autograd.Function):
    r""":math:`y = \sum_r x_r` over the ranks of ``group``. The objective differentiated is the sum over ranks of
    each rank's own, so :math:`\partial L / \partial x_r = \sum_s \partial L_s / \partial y`: the backward is the
    same all-reduce of the cotangents (through this Function, so double backward works too)."""

    @staticmethod
    def forward(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def mean_over(parallel: Optional[DataParallel], tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``parallel.mean(tensors)``, or the tensors unchanged without ``parallel``."""
    return list(tensors) if parallel is None else parallel.mean(tensors)
