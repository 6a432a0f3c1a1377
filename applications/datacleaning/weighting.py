r"""How the upper variable :math:`x` sets the weight :math:`a_i \in (0, 1)` of each training sample.

* :class:`SampleLogits`: one logit per sample, :math:`x = w \in \mathbb R^n`, :math:`a_i = \sigma(w_i)`.
* :class:`WeightNet`: Meta-Weight-Net (Shu et al., NeurIPS 2019): a small network of the sample's loss,
  :math:`a_i = V_\phi(\ell_i) = \sigma(W_2\, \mathrm{relu}(W_1 \ell_i + b_1) + b_2)`, with :math:`x = \phi`,
  an MLP 1 -> ``hidden`` -> 1. The loss fed to :math:`V` is *detached* from :math:`\theta`, as in MWN:
  the weight is a function of the loss value, read as data, and the gradient in :math:`\theta` flows only
  through the factor :math:`\ell_i`, :math:`\nabla_\theta g = \mathrm{mean}_i V_\phi(\ell_i) \nabla \ell_i
  + \mu\theta`. Without the detach, :math:`\theta` could lower :math:`g` by moving losses to where
  :math:`V` is small (a term :math:`V'(\ell_i)\,\ell_i \nabla \ell_i` that rewards fitting a sample
  *less*), which is not the reweighted training MWN describes. Consequently every hypergradient here
  is the exact one of the problem whose weights :math:`V_\phi(\ell_i)` are frozen at the current
  losses; the dependence of the weights on :math:`\theta` through the losses is dropped.

Each keeps its variable a flat 1-d tensor (the network's parameters are views into it), so the methods
and the runner, written for a tensor upper variable, work unchanged.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

__all__ = ["WEIGHTINGS", "SampleLogits", "WeightNet", "Weighting"]


class Weighting:
    """Base: ``init`` makes the upper variable, ``logits(x, losses, batch)`` the weights' logits."""

    def lr_scale(self, n_train: int) -> float:
        """The outer optimizer's learning rate is ``outer_lr * lr_scale(n_train)``."""
        raise NotImplementedError  # pragma: no cover - interface

    def init(self, n_train: int, w0: float, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def logits(self, x: torch.Tensor, losses: torch.Tensor, batch: Optional[torch.Tensor]) -> torch.Tensor:
        """The logit of each sample's weight (monotone in the weight, used as its score); ``losses`` detached."""
        raise NotImplementedError  # pragma: no cover - interface

    def weights(self, x: torch.Tensor, losses: torch.Tensor, batch: Optional[torch.Tensor]) -> torch.Tensor:
        """:math:`a_i = \\sigma(\\text{logit}_i)` of the samples ``batch`` (``None``: all) with these ``losses``."""
        return torch.sigmoid(self.logits(x, losses.detach(), batch))


class SampleLogits(Weighting):
    """One logit per training sample, initialized to ``w0``."""

    def lr_scale(self, n_train: int) -> float:
        return float(n_train)  # the gradient of a mean over n samples has entries O(1/n)

    def init(self, n_train: int, w0: float, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full((n_train,), float(w0), dtype=dtype, device=device, requires_grad=True)

    def logits(self, x: torch.Tensor, losses: torch.Tensor, batch: Optional[torch.Tensor]) -> torch.Tensor:
        return x if batch is None else x[batch]


class WeightNet(Weighting):
    """The MLP 1 -> ``hidden`` -> 1 (ReLU, sigmoid output) of Meta-Weight-Net on the detached per-sample loss.

    Initialization: PyTorch's ``nn.Linear`` rule (uniform, bound 1/sqrt(fan_in)) from ``seed``, and the
    output bias ``w0``, so every weight starts near :math:`\\sigma(w_0)`.
    """

    def __init__(self, hidden: int = 100) -> None:
        if hidden < 1:
            raise ValueError(f"WeightNet: hidden must be >= 1, got {hidden}")
        self.hidden = hidden

    def lr_scale(self, n_train: int) -> float:
        return 1.0

    def unflatten(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Views ``W1 (h, 1), b1 (h,), W2 (h,), b2 ()`` into the flat parameter vector ``x`` of size 3h + 1."""
        h = self.hidden
        if x.shape != (3 * h + 1,):
            raise ValueError(f"WeightNet: expected {3 * h + 1} parameters, got shape {tuple(x.shape)}")
        return {"W1": x[:h].view(h, 1), "b1": x[h:2 * h], "W2": x[2 * h:3 * h], "b2": x[3 * h]}

    def init(self, n_train: int, w0: float, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        h = self.hidden
        first = torch.rand(2 * h, generator=gen, dtype=torch.float64) * 2 - 1  # fan_in 1: bound 1
        second = (torch.rand(h, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(h)
        x = torch.cat([first, second, torch.tensor([float(w0)], dtype=torch.float64)])
        return x.to(dtype=dtype, device=device).requires_grad_()

    def logits(self, x: torch.Tensor, losses: torch.Tensor, batch: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.unflatten(x)
        hidden = torch.relu(losses[:, None] @ p["W1"].T + p["b1"])
        return hidden @ p["W2"] + p["b2"]


#: Names (``weighting.name`` in the configuration) and their classes.
WEIGHTINGS = {"logits": SampleLogits, "network": WeightNet}
