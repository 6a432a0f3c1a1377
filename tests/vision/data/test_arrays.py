"""ImageArrays and the train/validation split."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from applications.vision.data import (
    ImageArrays,
    train_val_split,
)


def test_train_val_split_last_and_seeded(indexed_arrays: Callable[..., ImageArrays]) -> None:
    arrays = indexed_arrays(50)
    train, val = train_val_split(arrays, 5)
    assert train.y.tolist() == list(range(45)) and val.y.tolist() == list(range(45, 50))
    assert torch.equal(val.x, arrays.x[45:]) and val.classes == arrays.classes and val.mean == arrays.mean
    s_train, s_val = train_val_split(arrays, 5, seed=3)
    assert sorted(s_train.y.tolist() + s_val.y.tolist()) == list(range(50)) and len(s_val) == 5
    assert s_val.y.tolist() == sorted(s_val.y.tolist()) and s_val.y.tolist() != list(range(45, 50))
    assert torch.equal(train_val_split(arrays, 5, seed=3)[1].y, s_val.y)
    with pytest.raises(ValueError):
        train_val_split(arrays, 50)


def test_train_val_split_warns_on_class_sorted_data() -> None:
    arrays = ImageArrays(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20) // 10, ["a", "b"])
    with pytest.warns(UserWarning, match="no image of classes"):
        train_val_split(arrays, 5)
