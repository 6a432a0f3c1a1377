"""Label noise: exactly a fraction ``p`` of the labels replaced by uniformly random *wrong* labels."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["corrupt_labels"]


def corrupt_labels(labels: torch.Tensor, p: float, num_classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Replace exactly :math:`\mathrm{round}(p n)` labels, chosen uniformly, by a different class drawn uniformly.

    The corrupted indices are the first :math:`\mathrm{round}(p n)` of a permutation drawn from a
    ``torch.Generator`` seeded with ``seed``; each gets :math:`(y + s) \bmod K` with :math:`s` uniform in
    :math:`\{1, \dots, K - 1\}` (so the new label is uniform among the :math:`K - 1` wrong ones).

    Returns:
        (noisy labels, boolean mask of the corrupted samples); ``labels`` is not modified.
    """
    if labels.ndim != 1:
        raise ValueError(f"corrupt_labels: labels must be a 1-d tensor, got shape {tuple(labels.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"corrupt_labels: p must be in [0, 1], got {p}")
    if num_classes < 2:
        raise ValueError(f"corrupt_labels: need at least 2 classes to corrupt a label, got {num_classes}")
    n = labels.numel()
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[: round(p * n)]
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=gen)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift.to(labels.device)) % num_classes
    mask = torch.zeros(n, dtype=torch.bool, device=labels.device)
    mask[chosen] = True
    return noisy, mask
