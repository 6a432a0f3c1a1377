"""WideResNet (Zagoruyko & Komodakis, 2016) in the form used by TRADES and MART.

Pre-activation basic blocks, widths 16, 16k, 32k, 64k (k = widen factor), ``(depth - 4) / 6``
blocks per stage, strides 1, 2, 2, final BN + ReLU, global average pooling (the 8x8 ``avg_pool2d``
of the 32x32 case; adaptive here) and a linear classifier. WRN-34-10 has 46,160,474 parameters for 10 classes (the unused
``sub_block1`` of the TRADES file is left out, so the count is that of the network that runs).
Initialization as in TRADES: He-normal (fan-out) convolutions, BN weight 1 / bias 0, zero
linear bias. Parameter names follow the TRADES file (``block1.layer.0.convShortcut`` ...), so its
checkpoints load with ``strict=False`` (only the unused ``sub_block1`` entries are left over).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideBasicBlock", "WideStage", "WideResNet", "wide_resnet34_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide block. (B, in_planes, H, W) -> (B, out_planes, H / stride, W / stride).

    When the width is unchanged the residual is the raw input; otherwise both branches start from
    ``relu(bn1(x))`` and the shortcut is a strided 1x1 convolution (the TRADES/MART convention).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class WideStage(nn.Module):
    """``n`` wide blocks; the first one changes the width and applies the stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: (B, in_channels, H, W) -> logits (B, num_classes); H = W = 32 for CIFAR.

    Args:
        depth: total depth; ``(depth - 4)`` must be divisible by 6 (34 -> 5 blocks per stage).
        widen_factor: width multiplier k.
        num_classes: number of output logits.
        in_channels: channels of the input images.
        dropout: dropout probability between the two convolutions of a block (0 in TRADES).
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1, dropout)
        self.block2 = WideStage(n, widths[1], widths[2], 2, dropout)
        self.block3 = WideStage(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.n_channels = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(out.flatten(1))


def wide_resnet34_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-34-10: 46,160,474 parameters for 10 classes, RGB input."""
    return WideResNet(34, 10, num_classes=num_classes, in_channels=in_channels, dropout=dropout)
