"""Oracles for the accuracy evaluations: closed-form robust accuracy of linear models, modes restored."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _linear_oracle import DT, images, linear_model, worst_case_linear  # noqa: E402
from torch import nn

from applications.adversarial.evaluation import autoattack_accuracy, robust_accuracy

HAS_AUTOATTACK = importlib.util.find_spec("pyautoattack") is not None


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
    # the accuracy after each attack, as pyautoattack logs it (to 0.01 %): here the one attack's, the final one
    assert out["per_attack"] == {"apgd-ce": pytest.approx(out["robust_acc"], abs=1e-4)}
    assert out["warnings"] == []


class Quantized(nn.Module):
    """A linear classifier of the input rounded to quarters: its gradient is zero almost everywhere, so
    gradient attacks stall while a black-box search still finds adversarial examples (gradient masking)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 2)
        w = torch.randn(16, generator=torch.Generator().manual_seed(1))
        w = w - w.mean()  # the mid-grey image on the boundary
        with torch.no_grad():
            self.linear.weight.copy_(torch.stack([w, -w]))  # logit difference 2 w.x: margins of either sign
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.round(4 * x.flatten(1)) / 4)


@pytest.mark.skipif(not HAS_AUTOATTACK, reason="pyautoattack is not installed")
def test_autoattack_reports_its_checks_when_gradients_are_masked(caplog) -> None:
    """Square (black box) beats APGD-CE on a model with zero gradients: AutoAttack's own checks fire, and
    they come back in ``warnings`` (and as warnings of our logger); pyautoattack's logger is left as found."""
    import logging

    model = Quantized()
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correctly classified
    aa_logger = logging.getLogger("auto-attack")
    before = (aa_logger.level, aa_logger.propagate, list(aa_logger.handlers))
    with caplog.at_level(logging.WARNING, logger="applications.adversarial.evaluation"):
        out = autoattack_accuracy(model, x, y, 0.3, version=["apgd-ce", "square"], batch_size=40, seed=0)
    assert (aa_logger.level, aa_logger.propagate, list(aa_logger.handlers)) == before
    per = out["per_attack"]
    assert list(per) == ["apgd-ce", "square"] and per["square"] < per["apgd-ce"]  # square found what APGD missed
    assert per["square"] == pytest.approx(out["robust_acc"], abs=1e-4)
    assert any("Square Attack has decreased the robust accuracy" in w for w in out["warnings"])
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(m.startswith("AutoAttack: ") for m in logged) == len(out["warnings"])
