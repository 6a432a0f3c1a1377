"""The oracles' shared pieces: a tiny float64 CNN and batch, reference starts and steps (the reference
implementations every method test compares with)."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

DT = torch.float64


def tiny_cnn(bn: bool = True, act: type = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: List[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [act(), nn.Conv2d(4, 4, 3, stride=2, padding=1), act(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)]
    return nn.Sequential(*layers).to(DT)


def batch(n: int = 6, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 5, 5, generator=g, dtype=DT)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.02], dtype=DT)  # pixels on / near the image box
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grads(model: nn.Module) -> List[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def method_grads(method, model: nn.Module, x, y, seed: int = 7) -> List[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = method.loss(model, x, y, generator=gen(seed))
    loss.backward()
    return grads(model)


def rel_err(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    num = sum(float((u - v).pow(2).sum()) for u, v in zip(a, b)) ** 0.5
    den = sum(float(v.pow(2).sum()) for v in b) ** 0.5
    return num / den


def ref_start(x: torch.Tensor, radius: float, seed: int = 7) -> torch.Tensor:
    """Uniform start in [-radius, radius] clipped to 0 <= x + d <= 1, written out."""
    u = torch.rand(x.shape, generator=gen(seed), dtype=x.dtype)
    return torch.clamp(x + (2 * u - 1) * radius, 0.0, 1.0) - x


def input_grad_ce_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    xin = x.detach().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(xin), y, reduction="sum"), xin, create_graph=create_graph)[0]


def bounds(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.maximum(-x, torch.full_like(x, -eps)), torch.minimum(1 - x, torch.full_like(x, eps))


def clip_ball_box(d: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto {|d| <= eps} & {0 <= x + d <= 1} with the combined bounds. (Clipping in two steps,
    clamp(x + clamp(d, -eps, eps), 0, 1) - x, leaves coordinates one rounding error off the bound, so a
    strict-interior mask would then count active coordinates as free: why the official code needs tol 1e-7.)"""
    lo, hi = bounds(x, eps)
    return torch.minimum(torch.maximum(d, lo), hi)


def bn_state(model: nn.Module) -> List[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers()]


class CountingWrapper(nn.Module):
    """Calls ``module``, counting the calls (a stand-in for the DDP wrapper of the trainer)."""

    """Stands for the DDP wrapper: forwards to ``module`` (same parameter tensors) and counts its calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(x)
