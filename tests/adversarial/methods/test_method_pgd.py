"""PGD-k (methods/pgd.py) against a reference loop in float64."""

from __future__ import annotations

import pytest
import torch
from _method_oracles import batch, clip_ball_box, gen, input_grad_ce_sum, ref_start, tiny_cnn

from applications.adversarial.methods import (
    PGDAT,
)


def test_pgd_at_matches_reference_loop() -> None:
    model = tiny_cnn(bn=False)
    x, y = batch()
    eps = 0.05
    method = PGDAT(eps=eps, steps=3)
    assert method.step_size == pytest.approx(2.5 * eps / 3)
    assert PGDAT(eps=8 / 255, steps=2).step_size == pytest.approx(4 / 255)
    assert PGDAT(eps=8 / 255).step_size == pytest.approx(2 / 255)
    d = ref_start(x, eps)
    for _ in range(3):
        d = clip_ball_box(d + method.step_size * input_grad_ce_sum(model, x + d, y).sign(), x, eps)
    got = method.perturbation(model, x, y, generator=gen())
    assert torch.allclose(got, d, rtol=0, atol=1e-15)



def test_pgd_at_zero_start_matches_reference_loop() -> None:
    model = tiny_cnn(bn=False)
    x, y = batch()
    eps = 0.05
    method = PGDAT(eps=eps, steps=3, random_start=False)
    d = torch.zeros_like(x)
    for _ in range(3):
        d = clip_ball_box(d + method.step_size * input_grad_ce_sum(model, x + d, y).sign(), x, eps)
    got = method.perturbation(model, x, y, generator=gen())
    assert torch.allclose(got, d, rtol=0, atol=1e-15)
    assert not torch.allclose(PGDAT(eps=eps, steps=3).perturbation(model, x, y, generator=gen()), d, rtol=0, atol=1e-4)
