"""Array files: .npz layouts and dtypes, and the torchvision loader without torchvision."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from applications.vision.data import (
    load_dataset,
    load_npz,
    load_torchvision,
)


def test_load_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_nhwc = rng.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nhwc.npz", x_train=x_nhwc, y_train=y, x_test=x_nhwc[:2], y_test=y[:2])
    train, test = load_npz(tmp_path / "nhwc.npz")
    assert torch.equal(train.x, torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)))
    assert train.y.tolist() == y.tolist() and train.classes == ["0", "1", "2"] and len(test) == 2

    x_float = x_nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.savez(tmp_path / "nchw.npz", x_train=x_float, y_train=y[:, None], x_test=x_float, y_test=y)
    f_train, _ = load_npz(tmp_path / "nchw.npz", classes=["a", "b", "c"], mean=(0.5,) * 3, std=(0.2,) * 3)
    assert torch.equal(f_train.x, train.x) and f_train.classes == ["a", "b", "c"] and f_train.mean == (0.5,) * 3

    grey = rng.integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x_train=grey, y_train=y[:4], x_test=grey, y_test=y[:4])
    g_train, _ = load_npz(tmp_path / "grey.npz")
    assert g_train.x.shape == (4, 1, 8, 8) and torch.equal(g_train.x[:, 0], torch.from_numpy(grey))

    square = rng.integers(0, 256, size=(2, 3, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "ambiguous.npz", x_train=square, y_train=y[:2], x_test=square, y_test=y[:2])
    with pytest.raises(ValueError, match="layout"):
        load_npz(tmp_path / "ambiguous.npz")
    assert load_npz(tmp_path / "ambiguous.npz", layout="NHWC")[0].x.shape == (2, 3, 3, 5)

    np.savez(tmp_path / "bad.npz", x_train=x_float * 255, y_train=y, x_test=x_float, y_test=y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "bad.npz")


def test_load_torchvision_without_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"bilevel\[vision\]"):
        load_torchvision("cifar10", tmp_path)
    with pytest.raises(ImportError, match=r"bilevel\[vision\]"):
        load_dataset("cifar10", tmp_path)
    # a mistyped data path is named as missing before torchvision is blamed
    with pytest.raises(ImportError, match=r"nowhere does not exist; give an image folder.*not installed"):
        load_dataset("cifar10", tmp_path / "nowhere")
