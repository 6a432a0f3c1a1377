"""Batched augmentation against per-sample reference loops and exact cases."""

from __future__ import annotations

import torch

from applications.vision.data import (
    Augment,
    crop_flip,
    rotate,
)


def reference_crop_flip(x: torch.Tensor, p: int, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-sample loop: zero-pad, crop, flip (torchvision RandomCrop + RandomHorizontalFlip)."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        padded = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=x.dtype)
        padded[:, p : p + h, p : p + w] = x[i]
        crop = padded[:, int(oy[i]) : int(oy[i]) + h, int(ox[i]) : int(ox[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out


def test_crop_flip_identity_and_flip() -> None:
    x = torch.rand(6, 3, 5, 7)
    p = 4
    centre = torch.full((6,), p)
    no_flip = torch.zeros(6, dtype=torch.bool)
    assert torch.equal(crop_flip(x, p, centre, centre, no_flip), x)
    chosen = torch.tensor([True, False, True, True, False, False])
    out = crop_flip(x, p, centre, centre, chosen)
    assert torch.equal(out[chosen], torch.flip(x[chosen], dims=[3])) and torch.equal(out[~chosen], x[~chosen])


def test_crop_flip_matches_per_sample_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.uint8):
        x = torch.randint(1, 256, (16, 3, 6, 9), generator=gen).to(dtype)
        p = 3
        oy, ox = torch.randint(0, 2 * p + 1, (2, 16), generator=gen)
        flip = torch.rand(16, generator=gen) < 0.5
        out = crop_flip(x, p, oy, ox, flip)
        assert torch.equal(out, reference_crop_flip(x, p, oy, ox, flip))
    # Exact translation with zero fill: shift down 2, right 1 (offsets p - 2, p - 1), no flip.
    x = torch.rand(1, 1, 6, 6) + 1
    shifted = crop_flip(x, 3, torch.tensor([1]), torch.tensor([2]), torch.tensor([False]))
    assert torch.equal(shifted[0, 0, 2:, 1:], x[0, 0, :-2, :-1])
    assert (shifted[0, 0, :2] == 0).all() and (shifted[0, 0, :, :1] == 0).all()


def test_rotate_exact_cases() -> None:
    x = torch.rand(4, 2, 8, 8)
    assert torch.equal(rotate(x, torch.zeros(4)), x)
    assert torch.equal(rotate(x, torch.full((4,), 90.0)), torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise
    assert torch.equal(rotate(x, torch.full((4,), -90.0)), torch.rot90(x, -1, dims=(2, 3)))
    rect = torch.rand(2, 1, 4, 6)
    assert torch.equal(rotate(rect, torch.tensor([180.0, 0.0])), torch.stack([rect[0].flip(1, 2), rect[1]]))
    # Rotating by 45 degrees leaves the corners empty (zero fill) and keeps the centre.
    ones = torch.ones(1, 1, 9, 9)
    r = rotate(ones, torch.tensor([45.0]))
    assert r[0, 0, 0, 0] == 0 and r[0, 0, 4, 4] == 1


def test_augment_reproduces_its_random_draws() -> None:
    x = torch.rand(8, 3, 10, 10)
    aug = Augment(crop_padding=4, flip=True, rotation=15.0)
    out = aug(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    oy, ox = torch.randint(0, 9, (2, 8), generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    angles = (2 * torch.rand(8, generator=g) - 1) * 15.0
    assert angles.abs().max() <= 15.0
    assert torch.equal(out, rotate(crop_flip(x, 4, oy, ox, flip), angles))
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(8)))
    assert torch.equal(Augment()(x, g), x)


def test_augment_presets() -> None:
    assert Augment.for_dataset("cifar10") == Augment(crop_padding=4, flip=True)
    assert Augment.for_dataset("CIFAR-100") == Augment(crop_padding=4, flip=True, rotation=15.0)
    assert Augment.for_dataset("svhn") is None and Augment.for_dataset("mnist5k") is None
