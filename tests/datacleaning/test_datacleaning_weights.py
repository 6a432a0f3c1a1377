import pytest
import torch

from applications.datacleaning.weights import roc_auc, weight_quality


def test_roc_auc_matches_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=gen).double()  # many ties
    positive = torch.rand(60, generator=gen) < 0.4
    s_pos, s_neg = scores[positive][:, None], scores[~positive][None, :]
    reference = ((s_pos > s_neg).double() + 0.5 * (s_pos == s_neg).double()).mean()
    assert float(roc_auc(scores, positive)) == pytest.approx(float(reference), abs=1e-12)


def test_weight_quality_on_a_known_ranking():
    corrupted = torch.tensor([True, True, False, False, False, True, False, False])  # p = 3/8
    w = torch.tensor([-3.0, 1.0, -2.0, 0.5, 2.0, -1.0, 3.0, 4.0])  # lowest three: 0, 2, 5
    q = weight_quality(w, corrupted)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    # pairs (corrupted weight < clean weight): -3 beats 5, 1 beats 3 (0.5 no, -2 no), -1 beats 4 of 5
    assert q["auc"] == pytest.approx((5 + 3 + 4) / 15)
