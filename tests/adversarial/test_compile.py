"""Fast-BAT with the implicit gradient by differences under ``torch.compile``: the eager step's gradient.

The backend is ``aot_eager`` (AOTAutograd's forward/backward split, which is what refuses a double
backward, without code generation): ``inductor``, the trainer's backend, gave the same gradient on a
similar network when tried by hand (relative difference 7e-7 in float32) but compiled for about 50 s on
a 2-core machine, too long for the suite.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel as bl
from applications.adversarial.methods import FastBAT


def relu_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def step(model: nn.Module, method: FastBAT, x, y, attack_model: nn.Module):
    model.zero_grad()
    loss, _ = method.loss(attack_model, x, y, generator=torch.Generator().manual_seed(0), attack_model=attack_model)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], {k: b.clone() for k, b in model.named_buffers()}


@pytest.mark.parametrize("products", [bl.ForwardDifference(), bl.CentralDifference()])
def test_compiled_step_gives_the_eager_gradient(products):
    torch.manual_seed(0)
    model = relu_cnn().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    method = FastBAT(eps=0.1, products=products)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_e, grads_e, buffers_e = step(model, method, x, y, model)
    model.load_state_dict(state)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss_c, grads_c, buffers_c = step(model, method, x, y, compiled)
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=0)
    for name, g_c, g_e in zip([n for n, _ in model.named_parameters()], grads_c, grads_e):
        assert float((g_c - g_e).norm()) <= 1e-5 * float(g_e.norm()), name
    for k in buffers_e:  # the training forward's BatchNorm update, once, in both
        assert torch.allclose(buffers_c[k].double(), buffers_e[k].double(), rtol=1e-6, atol=1e-7), k
    assert int(buffers_c["1.num_batches_tracked"]) == 1


def test_exact_implicit_gradient_under_compile_raises():
    """Why the trainer refuses compile with the exact implicit gradient (requires_double_backward)."""
    torch.manual_seed(0)
    model = relu_cnn().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    assert FastBAT(eps=0.1).requires_double_backward
    with pytest.raises(RuntimeError, match="double backward"):
        step(model, FastBAT(eps=0.1), x, y, compiled)
