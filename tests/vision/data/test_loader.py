"""DeviceLoader: order, seeded permutations, resumable generator state, channels-last."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from applications.vision.data import (
    Augment,
    DeviceLoader,
    ImageArrays,
)


def test_device_loader_in_order_without_shuffle(indexed_arrays: Callable[..., ImageArrays]) -> None:
    arrays = indexed_arrays(10)
    loader = DeviceLoader(arrays, 4, shuffle=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [4, 4, 2]
    xs = torch.cat([x for x, _ in batches])
    assert xs.dtype == torch.float32 and torch.equal(xs, arrays.x.float() / 255)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    assert len(DeviceLoader(arrays, 4, drop_last=True)) == 2 == len(list(DeviceLoader(arrays, 4, drop_last=True)))


def test_device_loader_shuffle_is_seeded_permutation(indexed_arrays: Callable[..., ImageArrays]) -> None:
    arrays = indexed_arrays(23)

    def epoch(loader: DeviceLoader) -> list:
        return [(x.clone(), y.clone()) for x, y in loader]

    a = DeviceLoader(arrays, 5, seed=1, augment=Augment(crop_padding=1, flip=True))
    first, second = epoch(a), epoch(a)
    ys = torch.cat([y for _, y in first])
    assert sorted(ys.tolist()) == list(range(23)) and ys.tolist() != list(range(23))
    assert torch.cat([y for _, y in second]).tolist() != ys.tolist()  # a new permutation each pass
    for x, y in first:  # images still belong to their labels (crop keeps the constant centre)
        assert torch.equal(x[:, :, 1:3, 1:3], (y % 256).float().div(255).view(-1, 1, 1, 1).expand(-1, 1, 2, 2))
    b = DeviceLoader(arrays, 5, seed=1, augment=Augment(crop_padding=1, flip=True))
    for (xa, ya), (xb, yb) in zip(first + second, epoch(b) + epoch(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.cat([y for _, y in DeviceLoader(arrays, 5, seed=2)]).tolist() != ys.tolist()


def test_device_loader_generator_state_resumes(indexed_arrays: Callable[..., ImageArrays]) -> None:
    arrays = indexed_arrays(12)
    loader = DeviceLoader(arrays, 4, seed=0, augment=Augment(crop_padding=2, flip=True))
    list(loader)
    state = loader.generator.get_state()
    expected = [(x.clone(), y.clone()) for x, y in loader]
    resumed = DeviceLoader(arrays, 4, seed=123, augment=Augment(crop_padding=2, flip=True))
    resumed.generator.set_state(state)
    for (xa, ya), (xb, yb) in zip(expected, resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_device_loader_channels_last_and_device(indexed_arrays: Callable[..., ImageArrays]) -> None:
    arrays = indexed_arrays(6, c=3)
    loader = DeviceLoader(arrays, 3, device="cpu", channels_last=True)
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.device.type == "cpu"
    assert y.dtype == torch.int64 and loader.generator.device.type == "cpu"


def test_device_loader_ranks_take_strided_rows_of_the_global_batch(indexed_arrays: Callable[..., ImageArrays]) -> None:
    arrays = indexed_arrays(24, h=6, w=6)
    augment = Augment(crop_padding=2, flip=True)
    whole = list(DeviceLoader(arrays, 8, seed=5, drop_last=True, augment=augment))
    ranks = [list(DeviceLoader(arrays, 8, seed=5, drop_last=True, augment=augment, rank=r, world_size=2))
             for r in range(2)]
    assert len(whole) == 3 and all(len(r) == 3 for r in ranks)
    for j, (x, y) in enumerate(whole):
        for r in range(2):
            xr, yr = ranks[r][j]
            assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2])
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(arrays, 8, rank=2, world_size=2)
