r"""The DARTS supernet of ``darts_digits.py``: a stem, one cell of softmax(alpha)-mixed operations, a classifier.

Candidate operations per edge: zero, skip, 3x3 max pooling, 3x3 and 5x5 convolutions and a dilated 3x3
convolution (``CONVS``: kernel, padding, dilation). ``smooth=True`` swaps ReLU and max pooling for tanh and
average pooling (no kinks), for the finite-difference study.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OPS", "CONVS", "Supernet"]

OPS = ("zero", "skip", "max_pool_3x3", "conv_3x3", "conv_5x5", "dil_conv_3x3")
CONVS = {"conv_3x3": (3, 1, 1), "conv_5x5": (5, 2, 1), "dil_conv_3x3": (3, 2, 2)}  # kernel, padding, dilation


class Supernet(nn.Module):
    r"""Stem (3x3 conv, stride 2), one cell, classifier. Node :math:`j \ge 1` of the cell is
    :math:`\sum_{i<j} \sum_o \mathrm{softmax}(\alpha_{(i,j)})_o\, o(h_i)` (node 0 = the stem), the nodes are
    concatenated, pooled 2x2 and classified. Convolutions are act -> conv. ``smooth``: tanh and average
    pooling instead of ReLU and max pooling (no kinks). With ``genotype`` (one op per edge) only those ops run:
    the derived network."""

    def __init__(self, channels: int, nodes: int, image: int, smooth: bool = False,
                 genotype: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.edges = [(i, j) for j in range(1, nodes + 1) for i in range(j)]
        self.smooth, self.genotype, self.nodes = smooth, genotype, nodes
        self.stem = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.ops = nn.ParameterDict()
        for e in range(len(self.edges)):
            for op, (k, _, _) in CONVS.items():
                if genotype is None or genotype[e] == op:
                    std = math.sqrt(2.0 / (channels * k * k))
                    self.ops[f"e{e}_{op}"] = nn.Parameter(torch.randn(channels, channels, k, k) * std)
        side = (image + 1) // 2 // 2
        self.head = nn.Linear(nodes * channels * side * side, 10)

    def _op(self, name: str, e: int, h: torch.Tensor) -> torch.Tensor:
        if name == "skip":
            return h
        if name == "max_pool_3x3":
            return F.avg_pool2d(h, 3, 1, 1, count_include_pad=False) if self.smooth else F.max_pool2d(h, 3, 1, 1)
        _, pad, dil = CONVS[name]
        return F.conv2d(torch.tanh(h) if self.smooth else F.relu(h), self.ops[f"e{e}_{name}"], padding=pad, dilation=dil)

    def forward(self, x: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = None if self.genotype is not None else torch.softmax(alpha, dim=-1)
        h = [self.stem(x)]
        for j in range(1, self.nodes + 1):
            s = 0.0
            for e in (e for e, (_, jj) in enumerate(self.edges) if jj == j):
                i = self.edges[e][0]  # the zero op contributes nothing, whatever its weight
                if weights is not None:
                    s = s + sum(weights[e, o] * self._op(op, e, h[i]) for o, op in enumerate(OPS) if op != "zero")
                elif self.genotype[e] != "zero":
                    s = s + self._op(self.genotype[e], e, h[i])
            h.append(s)
        out = torch.cat(h[1:], dim=1)
        out = F.avg_pool2d(torch.tanh(out) if self.smooth else F.relu(out), 2)
        return self.head(out.flatten(1))
