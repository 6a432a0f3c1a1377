"""On CUDA, a training step of every method runs without a host synchronization (constraints included)."""

import pytest
import torch

from applications.adversarial.methods import METHODS, build_method
from applications.adversarial.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

OPTIONS = {"grad_align": {"ga_coef": 0.2}, "pgd": {"steps": 2}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_step_has_no_host_sync(name):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (0.1307,), (0.3081,)).cuda().train()
    x = torch.rand(16, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    method = build_method(name, eps=0.1, **OPTIONS.get(name, {}))
    method.loss(model, x, y)[0].backward()  # warm-up (lazy CUDA initialisation may sync)
    model.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = method.loss(model, x, y)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
