"""Fast-AT (methods/fast_at.py): FGSM from a uniform start, against a reference in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _method_oracles import batch, clip_ball_box, gen, grads, input_grad_ce_sum, method_grads, ref_start, rel_err, tiny_cnn

from applications.adversarial.attacks import uniform_start
from applications.adversarial.methods import (
    FastAT,
)


def test_fast_at_is_fgsm_rs() -> None:
    model = tiny_cnn(bn=True)
    x, y = batch()
    eps = 8 / 255
    method = FastAT(eps=eps)
    assert method.step_size == pytest.approx(1.25 * eps)
    got = method.perturbation(model, x, y, generator=gen())
    z0 = ref_start(x, eps)
    ref = clip_ball_box(z0 + 1.25 * eps * input_grad_ce_sum(model, x + z0, y).sign(), x, eps)
    assert not got.requires_grad
    assert torch.allclose(got, ref, rtol=0, atol=1e-15)
    # the training gradient is the plain gradient at the fixed perturbation
    model.zero_grad()
    F.cross_entropy(model(x + ref), y).backward()
    assert rel_err(method_grads(method, model, x, y), grads(model)) < 1e-12


def test_fast_at_zero_start_is_fgsm() -> None:
    """``random_start=False`` is FGSM (Goodfellow et al.): eps * sign of the clean input gradient, in the box."""
    model = tiny_cnn(bn=False)
    x, y = batch()
    eps = 0.1
    got = FastAT(eps=eps, random_start=False).perturbation(model, x, y, generator=gen())
    ref = clip_ball_box(eps * input_grad_ce_sum(model, x, y).sign(), x, eps)
    assert torch.allclose(got, ref, rtol=0, atol=1e-15)
    assert not torch.allclose(FastAT(eps=eps).perturbation(model, x, y, generator=gen()), ref, rtol=0, atol=1e-3)


def test_uniform_start_formula() -> None:
    x, _ = batch()
    assert torch.allclose(uniform_start(x, 0.1, gen(3)), ref_start(x, 0.1, 3), rtol=0, atol=1e-15)

