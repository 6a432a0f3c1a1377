"""Oracles for PGD: closed-form worst cases on linear models, restart bookkeeping."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _linear_oracle import DT, images, linear_model, small_cnn, worst_case_linear  # noqa: E402
from torch import nn

from applications.adversarial.attacks import pgd_attack


def test_pgd_reaches_the_closed_form_worst_case_on_a_linear_model() -> None:
    model = linear_model()
    x = images(12)
    y = torch.randint(0, 2, (12,), generator=torch.Generator().manual_seed(2))
    eps = 0.1
    delta = pgd_attack(model, x, y, eps, steps=10, generator=torch.Generator().manual_seed(3))
    ref = worst_case_linear(model, x, y, eps)
    assert torch.allclose(delta, ref, rtol=0, atol=1e-15)
    # the loss equals the closed-form maximum
    with torch.no_grad():
        loss = F.cross_entropy(model(x + delta), y, reduction="none")
    lin = model[1]
    w, b = (lin.weight[1] - lin.weight[0]).detach(), (lin.bias[1] - lin.bias[0]).detach()
    s = (2 * y - 1).to(DT)
    margin = s * (x.flatten(1) @ w + b) + (ref.flatten(1) * (s[:, None] * w)).sum(1)
    assert torch.allclose(loss, F.softplus(-margin), rtol=1e-12, atol=0)
    # and exceeds the unconstrained-by-box robust logistic bound only where the box binds
    bound = F.softplus(-s * (x.flatten(1) @ w + b) + eps * w.abs().sum())
    assert bool((loss <= bound + 1e-12).all()) and float(loss[0]) < float(bound[0])


def test_pgd_respects_the_threat_set_and_is_detached() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(DT)
    x = images(8)
    y = torch.randint(0, 3, (8,))
    delta = pgd_attack(model, x, y, 8 / 255, steps=5, restarts=2)
    assert not delta.requires_grad
    assert float(delta.abs().max()) <= 8 / 255 + 1e-15
    assert float((x + delta).min()) >= 0 and float((x + delta).max()) <= 1
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(model, x, y, 0.0, steps=5)
    with pytest.raises(ValueError, match="restarts"):
        pgd_attack(model, x, y, 0.1, steps=5, restarts=0)




def test_restarts_keep_the_worst_case_per_sample() -> None:
    """R restarts equal the per-sample best of R single runs drawn from the same generator stream,
    best = misclassified first, then the highest loss."""
    model = small_cnn()
    x = images(16)
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(4))
    eps, R = 0.2, 4
    got = pgd_attack(model, x, y, eps, steps=1, step_size=0.05, restarts=R, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    runs = [pgd_attack(model, x, y, eps, steps=1, step_size=0.05, restarts=1, generator=g) for _ in range(R)]
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(x + d), y, reduction="none") for d in runs])
        wrong = torch.stack([model(x + d).argmax(1) != y for d in runs])
    key = wrong.to(DT) * 1e6 + losses  # lexicographic (wrong, loss); losses here are far below 1e6
    best = key.argmax(0)
    ref = torch.stack(runs)[best, torch.arange(16)]
    assert torch.equal(got, ref)  # replay: the restarts are the same single-restart runs, one after another
    assert len({int(b) for b in best}) > 1  # the runs really differ
    with torch.no_grad():
        got_loss = F.cross_entropy(model(x + got), y, reduction="none")
    assert bool((got_loss >= losses.min(0).values).all())






HAS_AUTOATTACK = importlib.util.find_spec("pyautoattack") is not None




