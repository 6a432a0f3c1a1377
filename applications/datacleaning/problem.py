r"""The data-cleaning bi-level program.

.. math::

    \min_{w \in \mathbb R^n} f(\theta^\star(w)) = \frac{1}{n_{val}} \sum_{j \in val} \ell(\theta^\star(w); x_j, y_j)
    \quad \text{s.t.} \quad
    \theta^\star(w) = \arg\min_\theta g(w, \theta) = \frac1n \sum_{i=1}^n \sigma(w_i)\, \ell(\theta; x_i, \tilde y_i)
    + \frac{\mu}{2} \|\theta\|^2,

with :math:`\ell` the cross-entropy, :math:`\tilde y` the noisy training labels and :math:`\sigma` the
sigmoid. The upper variable is the logit vector :math:`w` (one per training sample); the lower variable
is the model's parameter dict :math:`\theta`. On a mini-batch :math:`B` of indices the sums become means
over :math:`B` (an unbiased estimate of the full objective).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .data import CleaningData
from .models import FunctionalModel

__all__ = ["DataCleaning"]

Params = Dict[str, torch.Tensor]


class DataCleaning:
    """The objectives ``lower(w, theta, batch)`` and ``upper(w, theta, batch)`` of one data set and model.

    ``batch`` is an int64 index tensor into the training (``lower``) or validation (``upper``) split, or
    ``None`` for the whole split.

    Args:
        data: the splits (:class:`~.data.CleaningData`).
        model: ``model(theta, images) -> logits``.
        weight_decay: :math:`\\mu`.
    """

    def __init__(self, data: CleaningData, model: FunctionalModel, weight_decay: float) -> None:
        self.data, self.model, self.weight_decay = data, model, float(weight_decay)

    @property
    def n_train(self) -> int:
        return int(self.data.y_train.numel())

    @property
    def n_val(self) -> int:
        return int(self.data.y_val.numel())

    def weighted_loss(self, weights: torch.Tensor, theta: Params, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`\mathrm{mean}_{i \in B}\, a_i \ell_i(\theta) + \frac\mu2 \|\theta\|^2` for per-sample weights :math:`a`."""
        x, y = self.data.x_train, self.data.y_train
        if batch is not None:
            x, y, weights = x[batch], y[batch], weights[batch]
        losses = F.cross_entropy(self.model(theta, x), y, reduction="none")
        decay = sum(t.square().sum() for t in theta.values())
        return (weights * losses).mean() + 0.5 * self.weight_decay * decay

    def lower(self, w: torch.Tensor, theta: Params, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`g(w, \theta, B)`: the training loss weighted by :math:`\sigma(w_i)`."""
        return self.weighted_loss(torch.sigmoid(w), theta, batch)

    def upper(self, w: torch.Tensor, theta: Params, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`f(\theta, B)`: the cross-entropy on the clean validation split (``w`` is unused)."""
        x, y = self.data.x_val, self.data.y_val
        if batch is not None:
            x, y = x[batch], y[batch]
        return F.cross_entropy(self.model(theta, x), y)

    @torch.no_grad()
    def val_loss(self, theta: Params) -> torch.Tensor:
        """The full validation cross-entropy (a 0-d tensor)."""
        return self.upper(torch.empty(0), theta)

    @torch.no_grad()
    def test_accuracy(self, theta: Params, chunk: int = 1000) -> torch.Tensor:
        """Accuracy on the test split (a 0-d tensor)."""
        x, y = self.data.x_test, self.data.y_test
        correct = sum((self.model(theta, x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum() for i in range(0, len(y), chunk))
        return correct / len(y)
