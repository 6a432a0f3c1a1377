"""Oracles for the evaluation attacks: closed-form worst cases on linear models, restart bookkeeping."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from applications.adversarial.attacks import autoattack_accuracy, pgd_attack, robust_accuracy

DT = torch.float64


def linear_model(d: int = 16, seed: int = 0) -> nn.Module:
    """A two-class linear classifier whose decision boundary passes near the centre of the image cube."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).to(DT)
    lin = model[1]
    with torch.no_grad():
        lin.weight.mul_(4.0)
        lin.bias[1] = lin.bias[0] - 0.5 * (lin.weight[1] - lin.weight[0]).sum()
    return model


def images(n: int, seed: int = 1, shape=(1, 4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=DT)
    x[0].view(-1)[:4] = torch.tensor([0.0, 1.0, 0.01, 0.99], dtype=DT)  # pixels where the box binds
    return x


def worst_case_linear(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Two-class linear model: CE = softplus(-s (w.(x + d) + b)), s = +1 for y = 1 and -1 for y = 0, with
    w = W_1 - W_0. It is increasing in -s w.d, so the maximizer over {|d| <= eps} & {0 <= x + d <= 1} is
    separable: d_j = clip(-s eps sign(w_j), -x_j, 1 - x_j)."""
    lin = model[1]
    w = (lin.weight[1] - lin.weight[0]).detach().view(1, *x.shape[1:])
    s = (2 * y - 1).to(DT).view(-1, *([1] * (x.ndim - 1)))
    return torch.minimum(torch.maximum(-s * eps * w.sign(), -x), 1 - x)


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


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(96, 4)).to(DT)


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
    assert torch.equal(got, ref)
    assert len({int(b) for b in best}) > 1  # the runs really differ
    with torch.no_grad():
        got_loss = F.cross_entropy(model(x + got), y, reduction="none")
    assert bool((got_loss >= losses.min(0).values).all())


def test_robust_accuracy_linear_model_closed_form_and_modes() -> None:
    model = linear_model()
    x = images(50)
    y = torch.randint(0, 2, (50,), generator=torch.Generator().manual_seed(5))
    eps = 0.05
    model.train()
    out = robust_accuracy(model, x, y, eps, steps=10, restarts=2, batch_size=16)
    assert model.training  # previous mode restored
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).to(DT).mean())
        robust = float((model(x + worst_case_linear(model, x, y, eps)).argmax(1) == y).to(DT).mean())
    assert out["n"] == 50
    assert out["clean_acc"] == pytest.approx(clean, abs=1e-12)
    assert out["robust_acc"] == pytest.approx(robust, abs=1e-12)
    assert out["robust_acc"] < out["clean_acc"]


def test_robust_accuracy_uint8_batches_and_bn_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    model.train()
    x_u8 = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 3, (30,))
    buffers = [b.clone() for b in model.buffers()]
    kw = dict(eps=8 / 255, steps=3, restarts=2)
    a = robust_accuracy(model, x_u8, y, batch_size=7, generator=torch.Generator().manual_seed(0), **kw)
    b = robust_accuracy(model, x_u8.float() / 255, y, batch_size=7, generator=torch.Generator().manual_seed(0), **kw)
    assert a == b
    assert a["robust_acc"] <= a["clean_acc"]
    assert all(torch.equal(u, v) for u, v in zip(buffers, model.buffers()))
    assert model.training and model[1].training
    with pytest.raises(TypeError, match="uint8 or floating point"):
        robust_accuracy(model, x_u8.long(), y, **kw)
    with pytest.raises(ValueError, match="disagree"):
        robust_accuracy(model, x_u8, y[:5], **kw)


HAS_AUTOATTACK = importlib.util.find_spec("pyautoattack") is not None


@pytest.mark.skipif(HAS_AUTOATTACK, reason="pyautoattack is installed")
def test_autoattack_missing_gives_install_hint() -> None:
    with pytest.raises(ImportError, match=r'pip install "bilevel\[autoattack\]"'):
        autoattack_accuracy(linear_model().float(), torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long), 8 / 255)


@pytest.mark.skipif(not HAS_AUTOATTACK, reason="pyautoattack is not installed")
def test_autoattack_apgd_on_linear_model() -> None:
    model = linear_model()
    x = images(20)
    y = torch.randint(0, 2, (20,), generator=torch.Generator().manual_seed(5))
    eps = 0.05
    with torch.no_grad():
        robust = float((model(x + worst_case_linear(model, x, y, eps)).argmax(1) == y).to(DT).mean())
    model.float()
    out = autoattack_accuracy(model, x.float(), y, eps, version=["apgd-ce"], batch_size=10, seed=0)
    assert out["n"] == 20 and out["robust_acc"] < out["clean_acc"]
    assert out["robust_acc"] == pytest.approx(robust, abs=1 / 20 + 1e-9)  # one float32 tie at most
