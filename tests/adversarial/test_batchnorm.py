"""BatchNorm2d with the lean double backward: same values, statistics and derivatives as nn.BatchNorm2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from applications.adversarial.methods import FastBAT, bn_stats_frozen
from applications.adversarial.models import BatchNorm2d, batch_norm_train

DT = torch.float64


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, **kwargs).to(DT)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = BatchNorm2d(3, **kwargs).to(DT)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False},
                                    {"eps": 1e-3, "momentum": 0.3}])
def test_values_and_running_statistics_match_nn_batchnorm(kwargs):
    ref, ours = _pair(**kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(5, 3, 4, 4, generator=gen, dtype=DT) * (step + 1) + step
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        torch.testing.assert_close(yo, yr, rtol=1e-13, atol=1e-13)
        g = torch.randn_like(yr)
        torch.testing.assert_close(torch.autograd.grad(yo, xo, g)[0], torch.autograd.grad(yr, xr, g)[0],
                                   rtol=1e-12, atol=1e-13)
    for (name, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13, msg=name)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(affine):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 3, 3, generator=gen, dtype=DT, requires_grad=True)
    if affine:
        w = (torch.rand(2, generator=gen, dtype=DT) + 0.5).requires_grad_()
        b = torch.randn(2, generator=gen, dtype=DT, requires_grad=True)
        inputs = (x, w, b)
        fn = lambda x, w, b: batch_norm_train(x, w, b, None, None, 0.1, 1e-5)  # noqa: E731
    else:
        inputs = (x,)
        fn = lambda x: batch_norm_train(x, None, None, None, None, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_second_derivative_matches_pytorch_rule():
    """Double backward with cotangents on all three outputs of the first backward (g_x, g_gamma, g_beta)."""
    ref, ours = _pair()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 5, 5, generator=gen, dtype=DT)
    gy = torch.randn(6, 3, 5, 5, generator=gen, dtype=DT)
    cot = [torch.randn(6, 3, 5, 5, generator=gen, dtype=DT), torch.randn(3, generator=gen, dtype=DT),
           torch.randn(3, generator=gen, dtype=DT)]
    results = []
    for bn in (ref, ours):
        xx, gg = x.clone().requires_grad_(), gy.clone().requires_grad_()
        first = torch.autograd.grad(bn(xx), [xx, bn.weight, bn.bias], gg, create_graph=True)
        results.append(torch.autograd.grad(first, [xx, gg, bn.weight], cot))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _tiny_bn_net(bn_cls):
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn_cls(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         bn_cls(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(DT)


def test_fast_bat_exact_gradient_unchanged():
    """The implicit gradient differentiates BatchNorm twice: same Fast-BAT gradient with either layer."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(8, 1, 6, 6, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=gen)
    grads = []
    for cls in (nn.BatchNorm2d, BatchNorm2d):
        model = _tiny_bn_net(cls)
        loss, _ = FastBAT(eps=8 / 255, lam=None).loss(model, x, y, generator=torch.Generator().manual_seed(6))
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)
    # the implicit term is present and large enough for this check to see a wrong second derivative
    model = _tiny_bn_net(BatchNorm2d)
    loss, _ = FastBAT(eps=8 / 255, lam=float("inf")).loss(model, x, y, generator=torch.Generator().manual_seed(6))
    loss.backward()
    no_ig = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float((no_ig - grads[0]).norm() / grads[0].norm()) > 1e-3


def test_bn_stats_frozen_and_no_grad_and_channels_last():
    _, ours = _pair()
    before = copy.deepcopy(ours.state_dict())
    x = torch.randn(4, 3, 4, 4, dtype=DT, requires_grad=True)
    with bn_stats_frozen(ours):
        ours(x).sum().backward()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # the nn.BatchNorm2d path; statistics still update in training mode
        ours(x)
    assert int(ours.num_batches_tracked) == 1
    ref, ours = _pair()
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    yo, yr = ours(xc), ref(x.detach())
    torch.testing.assert_close(yo, yr)
    (gx,) = torch.autograd.grad(yo, xc, torch.ones_like(yo) + xc, create_graph=True)
    (h,) = torch.autograd.grad((gx * gx).sum(), xc)
    xr = x.detach().clone().requires_grad_()
    yr = ref(xr)
    (gxr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr) + xr, create_graph=True)
    (hr,) = torch.autograd.grad((gxr * gxr).sum(), xr)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_matches_nn_batchnorm():
    """Under bf16 autocast the layer gives PyTorch's Fast-BAT gradient (bf16 itself moves this tiny net's exact-IG
    gradient to cosine 0.86 from float32, with either layer)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(8, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    grads = []
    for cls in (nn.BatchNorm2d, BatchNorm2d):
        model = _tiny_bn_net(cls).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = FastBAT(eps=8 / 255, lam=None).loss(model, x, y, generator=torch.Generator().manual_seed(6))
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)) > 0.9999
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=2e-3)


def test_use_lean_batchnorm_swaps_layers_keeping_state_and_outputs():
    from applications.adversarial.models import build_model, use_lean_batchnorm

    torch.manual_seed(0)
    model = build_model("preact_resnet18", 10, 3, 0.5, 0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    before, state = model(x), copy.deepcopy(model.state_dict())
    assert use_lean_batchnorm(model) is model
    assert sum(isinstance(m, BatchNorm2d) for m in model.modules()) == 17 and not model.training
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # replay: eval mode runs nn.BatchNorm2d.forward
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    lean = build_model("preact_resnet18", 10, 3, 0.5, 0.5, lean_batchnorm=True)
    assert sum(isinstance(m, BatchNorm2d) for m in lean.modules()) == 17
    with pytest.raises(ValueError, match="lean_batchnorm"):
        build_model("small_cnn", 10, 1, 0.5, 0.5, lean_batchnorm="yes")
