import pytest
import torch

from applications.datacleaning.corruption import corrupt_labels


def test_exactly_p_labels_replaced_by_wrong_ones_and_reproducible():
    labels = torch.arange(1000) % 10
    noisy, mask = corrupt_labels(labels, 0.37, 10, seed=3)
    assert int(mask.sum()) == 370
    assert torch.equal(noisy != labels, mask)  # every corrupted label is wrong, every other one kept
    again, mask2 = corrupt_labels(labels, 0.37, 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(mask2, mask)
    other, mask3 = corrupt_labels(labels, 0.37, 10, seed=4)
    assert not torch.equal(mask3, mask)
    assert torch.equal(labels, torch.arange(1000) % 10)  # input untouched


def test_wrong_labels_are_uniform_over_the_other_classes():
    labels = torch.zeros(20000, dtype=torch.int64)
    noisy, mask = corrupt_labels(labels, 0.9, 10, seed=0)
    counts = torch.bincount(noisy[mask], minlength=10).double()
    assert counts[0] == 0
    expected = mask.sum() / 9
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # chi-square with 8 degrees of freedom: P(> 27.9) < 0.0005


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="p must be in"):
        corrupt_labels(torch.zeros(5, dtype=torch.int64), 1.5, 10, 0)
    with pytest.raises(ValueError, match="1-d"):
        corrupt_labels(torch.zeros(5, 2, dtype=torch.int64), 0.5, 10, 0)
