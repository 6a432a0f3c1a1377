"""Random training augmentation of a whole batch on its device: crop with zero padding, flip, rotation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["Augment", "crop_flip", "rotate"]


def crop_flip(
    x: torch.Tensor, padding: int, offset_y: torch.Tensor, offset_x: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Per-sample crop of the zero-padded batch, then per-sample horizontal flip.

    Sample b of the output is ``pad(x[b], padding)[:, oy:oy + H, ox:ox + W]`` with ``oy =
    offset_y[b]``, ``ox = offset_x[b]`` (both in 0..2 * padding), mirrored left-right where
    ``flip[b]``. ``oy = ox = padding`` and no flip is the identity. Two ``gather`` calls, any dtype.

    Shapes: x (B, C, H, W); offset_y, offset_x (B,) integer; flip (B,) bool -> (B, C, H, W).
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    rows = offset_y.to(torch.int64)[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + offset_x.to(torch.int64)[:, None]  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def rotate(x: torch.Tensor, degrees: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Rotates each image about its centre by ``degrees[b]`` (counter-clockwise), zero fill.

    Like torchvision's ``RandomRotation`` (nearest interpolation, no expansion, fill 0), batched
    with ``affine_grid`` / ``grid_sample``. A multiple of 90 degrees on a square image is exact.

    Shapes: x (B, C, H, W) floating; degrees (B,) -> (B, C, H, W).
    """
    b, _, h, w = x.shape
    rad = degrees.to(device=x.device, dtype=x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # Output pixel -> input pixel, in normalized coordinates (x right, y down), aspect-corrected.
    theta = torch.stack(
        [torch.stack([cos, -sin * (h / w), zero], 1), torch.stack([sin * (w / h), cos, zero], 1)], 1
    )
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Augment:
    """Random training augmentation applied to a whole batch on its device.

    In order: random crop of the zero-padded image (``crop_padding`` pixels each side; offsets
    uniform in 0..2p per sample, torchvision's ``RandomCrop(size, padding=p)``), horizontal flip
    with probability 1/2 per sample (``flip``), rotation by an angle uniform in
    [-rotation, rotation] degrees per sample (``RandomRotation(rotation)``). The random numbers come
    from the given generator: the same generator state gives the same augmentation.
    """

    crop_padding: int = 0
    flip: bool = False
    rotation: float = 0.0
    rotation_mode: str = "nearest"

    @classmethod
    def for_dataset(cls, name: str) -> Optional[Augment]:
        """The official code's augmentation: CIFAR-10 crop 4 + flip, CIFAR-100 also rotation 15,
        none for SVHN / MNIST-like data (returns None)."""
        key = name.lower().replace("-", "").replace("_", "")
        if key == "cifar10":
            return cls(crop_padding=4, flip=True)
        if key == "cifar100":
            return cls(crop_padding=4, flip=True, rotation=15.0)
        return None

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augments a batch. x: (B, C, H, W), float for rotation -> (B, C, H, W), same dtype."""
        b = x.shape[0]
        gen_device = generator.device

        def draw(values: torch.Tensor) -> torch.Tensor:
            return values.to(x.device, non_blocking=True)

        if self.crop_padding > 0 or self.flip:
            p = self.crop_padding
            if p > 0:
                offsets = draw(torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=gen_device))
            else:
                offsets = torch.zeros(2, b, dtype=torch.int64, device=x.device)
            if self.flip:
                flips = draw(torch.rand(b, generator=generator, device=gen_device) < 0.5)
            else:
                flips = torch.zeros(b, dtype=torch.bool, device=x.device)
            x = crop_flip(x, p, offsets[0], offsets[1], flips)
        if self.rotation > 0:
            if not x.is_floating_point():
                raise TypeError("rotation needs floating-point images")
            angles = draw(torch.rand(b, generator=generator, device=gen_device))
            x = rotate(x, (2.0 * angles - 1.0) * self.rotation, self.rotation_mode)
        return x
