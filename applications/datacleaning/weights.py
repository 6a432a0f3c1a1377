r"""How well learned per-sample weights separate corrupted from clean samples.

The score of "corrupted" is :math:`-w_i` (a low weight flags a corrupted label). Reported: the ROC-AUC
(the probability that a random corrupted sample is weighted below a random clean one, ties counting
half) and the precision / recall of the :math:`\lceil p n \rceil` lowest-weighted samples.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

__all__ = ["roc_auc", "weight_quality"]


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """ROC-AUC of ``scores`` for the boolean labels ``positive`` (Mann-Whitney U with mid-ranks for ties)."""
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"roc_auc: scores and positive must be 1-d of one shape, got {tuple(scores.shape)}, "
                         f"{tuple(positive.shape)}")
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc: needs both positive and negative samples")
    s = scores.detach().double()
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1) / 2  # 1-based mid-rank of each tie group
    ranks[order] = mid[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def weight_quality(w: torch.Tensor, corrupted: torch.Tensor) -> Dict[str, float]:
    """``auc``, ``precision`` and ``recall`` of the lowest-weighted fraction p = corrupted.mean() (host floats)."""
    k = math.ceil(float(corrupted.double().mean()) * corrupted.numel())
    flagged = torch.zeros_like(corrupted)
    flagged[torch.argsort(w.detach(), stable=True)[:k]] = True
    hits = float((flagged & corrupted).sum())
    n_pos = float(corrupted.sum())
    return {"auc": float(roc_auc(-w, corrupted)), "precision": hits / max(k, 1), "recall": hits / max(n_pos, 1.0)}
