"""PreActResNet-18, as used by Fast-AT (Wong et al., 2020) and Fast-BAT (Zhang et al., 2022).

Same architecture, forward pass and parameter layout as the ``PreActResNet18`` of the official
Fast-AT / Fast-BAT code (after He et al. 2016, "Identity Mappings in Deep Residual Networks"):
pre-activation blocks (BN -> ReLU -> conv), a 1x1 shortcut convolution of the block's *raw*
input when the stride or the width changes, a final BN + ReLU, global average pooling (the 4x4
``avg_pool2d`` of the 32x32 case; adaptive here so other sizes work too) and a linear classifier.

Parameter count for 10 classes and 3 input channels: 11,172,170. The often quoted 11,171,146 is
kuangliu's pytorch-cifar variant, which has no final BatchNorm (2 x 512 = 1,024 parameters fewer).
PyTorch's default initialization, as in the official code. Inputs are expected already normalized
(wrap the model in ``Normalized``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet18"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``.

    The shortcut is the identity, or a strided 1x1 convolution of ``x`` (as in the Fast-AT /
    Fast-BAT code; kuangliu's variant convolves ``relu(bn1(x))`` instead) when the stride is not 1
    or the number of channels changes. Shapes: (B, in_planes, H, W) ->
    (B, planes, H / stride, W / stride).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet: (B, in_channels, H, W) -> logits (B, num_classes); H = W = 32 in the paper.

    Args:
        num_blocks: blocks in each of the four stages (widths 64, 128, 256, 512; strides 1, 2, 2, 2).
        num_classes: number of output logits.
        in_channels: channels of the input images.
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must have 4 entries, got {list(num_blocks)}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512 * PreActBlock.expansion)
        self.linear = nn.Linear(512 * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.flatten(1))


def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """PreActResNet-18 (blocks 2-2-2-2): 11,172,170 parameters for 10 classes, RGB input."""
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)
