"""The small vision transformer: shapes, parameter count, gradients, and its (missing) double backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import bilevel as bl
from applications.adversarial.models.normalize import Normalized
from applications.adversarial.models.vit import VisionTransformer, vit_parameter_count

TINY = {"image_size": 8, "patch_size": 4, "dim": 8, "depth": 1, "heads": 2, "mlp_ratio": 2}


@pytest.mark.parametrize("options,shape", [
    ({}, (3, 32, 32)),
    ({"in_channels": 1, "image_size": 28, "patch_size": 7, "dim": 32, "depth": 2, "heads": 2}, (1, 28, 28)),
    ({**TINY, "num_classes": 3}, (3, 8, 8)),
])
def test_shapes_and_parameter_count(options, shape):
    torch.manual_seed(0)
    model = VisionTransformer(**options)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, options.get("num_classes", 10))
    count_options = {k: v for k, v in options.items() if k != "heads"}
    assert sum(p.numel() for p in model.parameters()) == vit_parameter_count(**count_options)


def test_default_parameter_count_by_hand():
    # d = 64, h = 128, N = 64: 3*16*64 + 64 + 64 + 65*64 + 4*(4*4096 + 2*64*128 + 9*64 + 128) + 128 + 650
    assert vit_parameter_count() == 3136 + 64 + 4160 + 4 * 33472 + 128 + 650 == 142026


def test_bad_options_and_inputs_raise():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        VisionTransformer(dim=30, heads=4)
    with pytest.raises(ValueError, match=r"expected \(B, C, 32, 32\)"):
        VisionTransformer()(torch.rand(2, 3, 28, 28))


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = Normalized(VisionTransformer(**TINY), 0.5, 0.25, channels=3)
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _attack(model, x, y):
    def objective(params, delta):
        return -F.cross_entropy(functional_call(model, params, (x + delta,)), y, reduction="sum")

    return bl.LowerProblem(objective, constraint=bl.LInfBall(0.0, 8 / 255) & bl.Box(-x, 1 - x))


def _ig(model, x, y, z, products):
    """Fast-BAT's implicit-gradient term d/dtheta <grad_delta l_atk(theta, z), u> through bilevel.Linearized."""
    params = dict(model.named_parameters())
    delta = bl.solve(_attack(model, x, y), params, z, bl.Linearized(step=2 / 255, products=products))
    v = torch.randn(delta.shape, generator=torch.Generator().manual_seed(1), dtype=delta.dtype)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(delta, list(params.values()), v)])


def test_double_backward_needs_the_math_kernel_and_differences_do_not():
    """On CPU scaled_dot_product_attention picks its flash kernel (no double backward, float32 and float64):
    the exact implicit gradient raises, the finite-difference one works with any kernel and, in float64,
    matches the exact one taken under the math kernel."""
    torch.manual_seed(0)
    model = Normalized(VisionTransformer(**TINY), 0.5, 0.25, channels=3).double()
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    z = (2 * torch.rand(x.shape, dtype=torch.float64) - 1) * (4 / 255)
    with pytest.raises(RuntimeError, match="not implemented"):
        _ig(model, x, y, z, bl.Exact())
    with sdpa_kernel(SDPBackend.MATH):
        exact = _ig(model, x, y, z, bl.Exact())
    central = _ig(model, x, y, z, bl.CentralDifference())
    forward = _ig(model, x, y, z, bl.ForwardDifference())
    assert float((central - exact).norm() / exact.norm()) < 1e-8
    assert float((forward - exact).norm() / exact.norm()) < 1e-5


def test_gradgradcheck_under_the_math_kernel():
    torch.manual_seed(0)
    model = VisionTransformer(**{**TINY, "image_size": 4, "patch_size": 2, "dim": 4}).double()
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(lambda inp: model(inp).square().sum(), (x,), fast_mode=True)
