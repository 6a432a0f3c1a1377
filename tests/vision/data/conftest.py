"""Fixtures shared by the dataset tests: indexed arrays, image trees on disk, the MNIST 5k splits."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from applications.vision.data import ImageArrays, load_mnist5k


@pytest.fixture(scope="session")
def mnist5k() -> tuple:
    return load_mnist5k()


@pytest.fixture
def indexed_arrays() -> Callable[..., ImageArrays]:
    """``make(n, c, h, w)``: image i is constant (i % 256) and has label i: batches reveal which images they hold."""

    def make(n: int = 10, c: int = 1, h: int = 4, w: int = 4) -> ImageArrays:
        x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, c, h, w).contiguous()
        return ImageArrays(x, torch.arange(n), [str(i) for i in range(n)], (0.5,) * c, (0.25,) * c)

    return make


@pytest.fixture
def make_tree() -> Callable[..., dict]:
    """``make(root, counts, size, mode, seed)`` writes random PNGs root/<split>/<class>/<i>.png and returns
    {(split, class, name): array HWC}."""

    def make(root: Path, counts: dict, size: tuple = (5, 6), mode: str = "RGB", seed: int = 0) -> dict:
        from PIL import Image

        rng = np.random.default_rng(seed)
        written = {}
        channels = 3 if mode == "RGB" else 1
        for (split, cls), n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size[0], size[1], channels), dtype=np.uint8)
                Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(folder / f"{i:03d}.png")
                written[(split, cls, f"{i:03d}.png")] = arr
        return written

    return make
