r"""A small vision transformer (Dosovitskiy et al., 2021) for 32x32-size images.

Patch embedding (a ``patch_size``-strided convolution), a class token and learned position embeddings,
``depth`` pre-norm blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` whose attention is
``torch.nn.functional.scaled_dot_product_attention``, a final LayerNorm and a linear head on the class
token. Inputs are expected already normalized (wrap the model in ``Normalized``, as ``build_model`` does).

Parameter count, with :math:`d` = ``dim``, :math:`h` = ``mlp_ratio * dim``, :math:`p` = ``patch_size``,
:math:`c` = ``in_channels``, :math:`N = (\text{image\_size}/p)^2` patches, :math:`L` = ``depth`` and
:math:`K` = ``num_classes``:

.. math:: c p^2 d + d \;+\; d \;+\; (N + 1) d \;+\; L\,(4d^2 + 2dh + 9d + h) \;+\; 2d \;+\; dK + K

(patch embedding, class token, position embeddings, blocks: two LayerNorms, qkv and output
projections, the MLP; final LayerNorm; head).

**Second derivatives.** ``scaled_dot_product_attention`` dispatches to fused kernels that have no double
backward: flash and memory-efficient attention on CUDA, and on CPU (PyTorch 2.13) the CPU flash kernel,
which it picks for float32 and float64 alike. A double backward through the model (Fast-BAT's exact
implicit gradient) then raises ``RuntimeError: derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented`` (or its CUDA
counterpart). Inside ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` the math kernel, built from
differentiable operations, is used and the double backward works. First-order gradients, and so the
finite-difference products of :mod:`bilevel.products`, work with every kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "ViTBlock", "VisionTransformer", "vit_parameter_count"]


class Attention(nn.Module):
    """Multi-head self-attention: (B, T, dim) -> (B, T, dim), through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d / heads)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (GELU MLP of width ``hidden``)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionTransformer(nn.Module):
    """Vision transformer: (B, in_channels, image_size, image_size) -> logits (B, num_classes).

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        image_size: side of the (square) input images; a multiple of ``patch_size``.
        patch_size: side of the square patches (the patch embedding's kernel and stride).
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: hidden width of the blocks' MLP, in units of ``dim``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"VisionTransformer: image_size ({image_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        self.image_size = image_size
        self.patch = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        n_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"VisionTransformer: expected (B, C, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(x.shape)}")
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embedding
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit_parameter_count(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                        dim: int = 64, depth: int = 4, mlp_ratio: int = 2) -> int:
    """The number of parameters of :class:`VisionTransformer` with these options (the module docstring's formula)."""
    d, h, n = dim, mlp_ratio * dim, (image_size // patch_size) ** 2
    return (in_channels * patch_size**2 * d + d) + d + (n + 1) * d + depth * (4 * d * d + 2 * d * h + 9 * d + h) \
        + 2 * d + d * num_classes + num_classes
