"""N-FGSM (methods/n_fgsm.py) against a reference in float64, and its bounds."""

from __future__ import annotations

import torch
from _method_oracles import batch, gen, input_grad_ce_sum, ref_start, tiny_cnn

from applications.adversarial.methods import (
    NFGSM,
)


def test_n_fgsm_reference_and_bounds() -> None:
    model = tiny_cnn(bn=False)
    x, y = batch()
    eps = 0.05
    method = NFGSM(eps=eps)
    got = method.perturbation(model, x, y, generator=gen())
    z0 = ref_start(x, 2 * eps)
    ref = torch.clamp(x + z0 + eps * input_grad_ce_sum(model, x + z0, y).sign(), 0, 1) - x
    assert torch.allclose(got, ref, rtol=0, atol=1e-15)
    assert float(got.abs().max()) > eps * 1.5  # really outside the eps-ball
    assert float(got.abs().max()) <= 3 * eps + 1e-12

