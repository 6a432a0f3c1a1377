"""GradAlign (methods/grad_align.py): the regularizer against finite differences, its edge cases, its coefficient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _method_oracles import DT, batch, clip_ball_box, gen, grads, input_grad_ce_sum, method_grads, rel_err, tiny_cnn
from torch import nn

from applications.adversarial.methods import (
    GradAlign,
    build_method,
    gradient_alignment,
)


def test_grad_align_regularizer_gradient_vs_finite_differences() -> None:
    model = tiny_cnn(bn=False, act=nn.Tanh)
    x, y = batch()
    noise = (2 * torch.rand(x.shape, generator=gen(5), dtype=DT) - 1) * 0.1
    params = list(model.parameters())
    g_clean_fixed = input_grad_ce_sum(model, x, y).flatten(1)

    for clean_graph in (True, False):
        model.zero_grad()
        gradient_alignment(model, x, y, noise, clean_grad_graph=clean_graph).backward()
        got = grads(model)

        def reg_value(clean_graph: bool = clean_graph) -> float:
            gc = input_grad_ce_sum(model, x, y).flatten(1) if clean_graph else g_clean_fixed
            gn = input_grad_ce_sum(model, x + noise, y).flatten(1)
            return float(1 - F.cosine_similarity(gc, gn, dim=1, eps=0).mean())

        h = 1e-6
        for p, gp in zip(params, got):
            for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
                old = p.data[idx].item()
                p.data[idx] = old + h
                up = reg_value()
                p.data[idx] = old - h
                down = reg_value()
                p.data[idx] = old
                fd = (up - down) / (2 * h)
                assert gp[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # the clean gradient's own derivative matters: the two variants differ
    model.zero_grad()
    gradient_alignment(model, x, y, noise, clean_grad_graph=True).backward()
    full = grads(model)
    model.zero_grad()
    gradient_alignment(model, x, y, noise, clean_grad_graph=False).backward()
    assert rel_err(grads(model), full) > 1e-3


def test_grad_align_skips_samples_with_zero_input_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).to(DT)
    x = torch.rand(3, 1, 2, 2, dtype=DT) + 0.1
    x[0] = -1.0  # ReLU kills every input of sample 0: its input gradients are exactly zero
    y = torch.tensor([0, 1, 2])
    noise = torch.full_like(x, 0.05)
    reg = gradient_alignment(model, x, y, noise)
    gc, gn = input_grad_ce_sum(model, x, y).flatten(1), input_grad_ce_sum(model, x + noise, y).flatten(1)
    assert float(gc[0].abs().sum()) == 0.0
    ref = 1 - F.cosine_similarity(gc[1:], gn[1:], dim=1).mean()
    assert float(reg.detach()) == pytest.approx(float(ref), abs=1e-14)


def test_grad_align_method_gradient() -> None:
    model = tiny_cnn(bn=False, act=nn.Tanh)
    x, y = batch()
    eps = 0.05
    method = GradAlign(eps=eps, ga_coef=0.7)
    assert GradAlign(eps=8 / 255).ga_coef == 0.2 and GradAlign(eps=16 / 255).ga_coef == 2.0
    got = method_grads(method, model, x, y)
    # independent: FGSM from zero with step eps, then CE + coef * (1 - cos) with the clean gradient constant
    d = clip_ball_box(eps * input_grad_ce_sum(model, x, y).sign(), x, eps)
    noise = (2 * torch.rand(x.shape, generator=gen(), dtype=DT) - 1) * eps
    gc = input_grad_ce_sum(model, x, y).flatten(1)
    gn = input_grad_ce_sum(model, x + noise, y, create_graph=True).flatten(1)
    loss = F.cross_entropy(model(x + d), y) + 0.7 * (1 - F.cosine_similarity(gc, gn, dim=1).mean())
    model.zero_grad()
    loss.backward()
    assert rel_err(got, grads(model)) < 1e-10


def test_grad_align_default_coefficient_only_at_published_radii() -> None:
    assert build_method("grad_align", eps=8 / 255).ga_coef == 0.2
    assert build_method("grad_align", eps=16 / 255).ga_coef == 2.0
    with pytest.raises(ValueError, match="no published ga_coef"):
        build_method("grad_align", eps=10 / 255)
    assert build_method("grad_align", eps=10 / 255, ga_coef=0.5).ga_coef == 0.5

