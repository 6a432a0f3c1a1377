"""Plain (non-adversarial) training, the baseline of every table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import Generator
from .base import TrainingMethod, check_eps

__all__ = ["Standard"]


@dataclass
class Standard(TrainingMethod):
    """Plain training: :math:`\\min_\\theta \\mathrm{CE}(h_\\theta(x), y)`. ``eps`` is accepted and ignored."""

    eps: float = 0.0
    name = "standard"

    def __post_init__(self) -> None:
        check_eps("standard", self.eps, allow_zero=True)

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        return torch.zeros_like(x)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
             attack_model: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits
