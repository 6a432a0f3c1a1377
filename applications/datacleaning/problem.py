r"""The data-cleaning bi-level program.

.. math::

    \min_{w \in \mathbb R^n} f(\theta^\star(w)) = \frac{1}{n_{val}} \sum_{j \in val} \ell(\theta^\star(w); x_j, y_j)
    \quad \text{s.t.} \quad
    \theta^\star(w) = \arg\min_\theta g(w, \theta) = \frac1n \sum_{i=1}^n \sigma(w_i)\, \ell(\theta; x_i, \tilde y_i)
    + \frac{\mu}{2} \|\theta\|^2,

with :math:`\ell` the cross-entropy, :math:`\tilde y` the noisy training labels and :math:`\sigma` the
sigmoid. The upper variable is the logit vector :math:`w` (one per training sample); the lower variable
is the model's parameter dict :math:`\theta`. On a mini-batch :math:`B` of indices the sums become means
over :math:`B` (an unbiased estimate of the full objective). With the Meta-Weight-Net weighting
(:class:`~.weighting.WeightNet`) the upper variable is the network's parameters :math:`\phi` and
:math:`\sigma(w_i)` becomes :math:`V_\phi(\ell_i)`, the loss detached from :math:`\theta`
(:mod:`~.weighting` says why).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .data import CleaningData
from .models import FunctionalModel
from .weighting import SampleLogits, Weighting

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
        weighting: how the upper variable weights the samples (default: one logit per sample).
    """

    def __init__(self, data: CleaningData, model: FunctionalModel, weight_decay: float,
                 weighting: Optional[Weighting] = None) -> None:
        self.data, self.model, self.weight_decay = data, model, float(weight_decay)
        self.weighting = weighting if weighting is not None else SampleLogits()

    @property
    def n_train(self) -> int:
        return int(self.data.y_train.numel())

    @property
    def n_val(self) -> int:
        return int(self.data.y_val.numel())

    def weighted_loss(self, weights: torch.Tensor, theta: Params, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`\mathrm{mean}_{i \in B}\, a_i \ell_i(\theta) + \frac\mu2 \|\theta\|^2` for per-sample weights :math:`a`."""
        if batch is not None:
            weights = weights[batch]
        return self._weighted(weights, self.train_losses(theta, batch), theta)

    def _weighted(self, weights: torch.Tensor, losses: torch.Tensor, theta: Params) -> torch.Tensor:
        decay = sum(t.square().sum() for t in theta.values())
        return (weights * losses).mean() + 0.5 * self.weight_decay * decay

    def train_losses(self, theta: Params, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-sample cross-entropies :math:`\\ell_i(\\theta)` of the training samples ``batch`` (``None``: all)."""
        x, y = self.data.x_train, self.data.y_train
        if batch is not None:
            x, y = x[batch], y[batch]
        return F.cross_entropy(self.model(theta, x), y, reduction="none")

    def lower(self, w: torch.Tensor, theta: Params, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`g(w, \theta, B)`: the training loss weighted by the weighting's :math:`a_i` (:math:`\sigma(w_i)`)."""
        losses = self.train_losses(theta, batch)
        return self._weighted(self.weighting.weights(w, losses, batch), losses, theta)

    @torch.no_grad()
    def weight_scores(self, w: torch.Tensor, theta: Params) -> torch.Tensor:
        """The logit of every training sample's weight at ``theta`` (monotone in the weight; for the metrics)."""
        return self.weighting.logits(w, self.train_losses(theta), None)

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
