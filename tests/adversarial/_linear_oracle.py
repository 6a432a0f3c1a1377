"""Models and images shared by the attack and evaluation tests: a two-class linear classifier whose
worst case over the threat set has a closed form, and a small CNN."""

from __future__ import annotations

import torch
from torch import nn

DT = torch.float64


def linear_model(d: int = 16, seed: int = 0) -> nn.Module:
    """A two-class linear classifier whose decision boundary passes near the centre of the image cube."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).to(DT)
    lin = model[1]
    with torch.no_grad():
        lin.weight.mul_(4.0)
        lin.bias[1] = lin.bias[0] - 0.5 * (lin.weight[1] - lin.weight[0]).sum()
    return model


def images(n: int, seed: int = 1, shape=(1, 4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=DT)
    x[0].view(-1)[:4] = torch.tensor([0.0, 1.0, 0.01, 0.99], dtype=DT)  # pixels where the box binds
    return x


def worst_case_linear(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Two-class linear model: CE = softplus(-s (w.(x + d) + b)), s = +1 for y = 1 and -1 for y = 0, with
    w = W_1 - W_0. It is increasing in -s w.d, so the maximizer over {|d| <= eps} & {0 <= x + d <= 1} is
    separable: d_j = clip(-s eps sign(w_j), -x_j, 1 - x_j)."""
    lin = model[1]
    w = (lin.weight[1] - lin.weight[0]).detach().view(1, *x.shape[1:])
    s = (2 * y - 1).to(DT).view(-1, *([1] * (x.ndim - 1)))
    return torch.minimum(torch.maximum(-s * eps * w.sign(), -x), 1 - x)


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(96, 4)).to(DT)
