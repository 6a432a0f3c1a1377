"""Per-channel input normalization inside the model.

With ``Normalized(model, mean, std)`` the network takes images in [0, 1], so attacks work in pixel
units (eps = 8/255 means 8 grey levels) and clamping to the image box is simply [0, 1].
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["Normalized", "as_channel_stats"]

Stats = Union[float, Sequence[float], torch.Tensor]


def as_channel_stats(value: Stats, channels: int) -> torch.Tensor:
    """Per-channel statistics as a float32 tensor of shape (1, C, 1, 1).

    A scalar (or a one-element sequence) is repeated over the ``channels`` channels; otherwise the
    number of values must equal ``channels``.
    """
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"expected 1 or {channels} per-channel values, got {t.numel()}")
    return t.clone().reshape(1, channels, 1, 1)


class Normalized(nn.Module):
    """Wraps ``model`` so that ``forward(x) = model((x - mean) / std)``.

    ``x``: (B, C, H, W) in [0, 1]. ``mean`` and ``std`` are buffers of shape (1, C, 1, 1): they move
    with ``.to(device)`` and are saved in the ``state_dict``. The wrapped network is ``.model``.

    Args:
        model: the network, taking normalized inputs.
        mean: per-channel mean (scalar or C values).
        std: per-channel standard deviation (scalar or C values, all > 0).
        channels: C; inferred from ``mean`` / ``std`` when they have more than one value, else 1.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Stats, std: Stats, channels: int | None = None) -> None:
        super().__init__()
        if channels is None:
            channels = max(torch.as_tensor(mean).numel(), torch.as_tensor(std).numel())
        mean_t = as_channel_stats(mean, channels)
        std_t = as_channel_stats(std, channels)
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.flatten().tolist()}")
        self.model = model
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
