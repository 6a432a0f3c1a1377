"""A small convolutional network for MNIST-size grey images (28x28 MNIST, 8x8 digits, ...).

conv3x3(32) -> ReLU -> conv3x3(64) -> ReLU -> maxpool 2 -> adaptive average pool to
``pool_size`` x ``pool_size`` -> linear(hidden) -> ReLU -> linear(num_classes). The adaptive pool
makes the input size free: any H, W >= 2 gives the same classifier shape.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Small CNN: (B, in_channels, H, W) -> logits (B, num_classes), for any H, W >= 2.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images (1 for MNIST / digits).
        width: channels of the first convolution (the second has ``2 * width``).
        hidden: units of the hidden fully connected layer.
        pool_size: side of the adaptive average pool before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        hidden: int = 128,
        pool_size: int = 4,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pool_size),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * pool_size * pool_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
