"""The lower-level models as functions of a parameter dict: ``model(params, images) -> logits``.

The lower variable of the bi-level problem is the parameter dict itself (a tree of tensors), so every
method of :mod:`bilevel` differentiates with respect to it through ``torch.func.functional_call``.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn
from torch.func import functional_call

from applications.vision.small_cnn import SmallCNN

__all__ = ["MODELS", "FunctionalModel", "Linear", "build_model"]

Params = Dict[str, torch.Tensor]
FunctionalModel = Callable[[Params, torch.Tensor], torch.Tensor]


class Linear(nn.Module):
    """Multinomial logistic regression on the flattened image: ``W vec(x) + b``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def _linear(shape: Tuple[int, ...], num_classes: int, **options: int) -> nn.Module:
    if options:
        raise TypeError(f"model 'linear' takes no options, got {sorted(options)}")
    c, h, w = shape
    return Linear(c * h * w, num_classes)


def _small_cnn(shape: Tuple[int, ...], num_classes: int, width: int = 8, hidden: int = 32, pool_size: int = 4
               ) -> nn.Module:
    return SmallCNN(num_classes, in_channels=shape[0], width=width, hidden=hidden, pool_size=pool_size)


#: Model names and their builders ``(image shape (C, H, W), num_classes, **options) -> nn.Module``.
MODELS = {"linear": _linear, "small_cnn": _small_cnn}


def build_model(name: str, shape: Tuple[int, ...], num_classes: int, seed: int, **options: int
                ) -> Tuple[FunctionalModel, Params]:
    """The functional model and its initial parameters (detached, drawn from ``seed``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MODELS[name](tuple(shape), num_classes, **options)
    params = {k: v.detach().clone() for k, v in module.named_parameters()}

    def model(p: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(module, p, (x,))

    return model, params
