"""Oracle tests of the adversarial-training models: parameter counts, forward semantics, wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from applications.adversarial.models import (
    MODELS,
    Normalized,
    PreActBlock,
    PreActResNet,
    SmallCNN,
    WideResNet,
    build_model,
    preact_resnet18,
    wide_resnet34_10,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Parameter counts (computed by hand from the architectures, checked against the built modules)
# ------------------------------------------------------------------------------------------------


def test_preact_resnet18_parameter_count() -> None:
    # Fast-AT / Fast-BAT PreActResNet-18 (with its final BatchNorm(512)): 11,172,170.
    # kuangliu's variant without the final BN has 11,171,146 = 11,172,170 - 2 * 512.
    model = preact_resnet18(num_classes=10)
    assert n_params(model) == 11_172_170
    assert n_params(model) - n_params(model.bn) == 11_171_146
    assert n_params(preact_resnet18(num_classes=100)) == 11_172_170 + 90 * 513


def test_wide_resnet34_10_parameter_count() -> None:
    model = wide_resnet34_10(num_classes=10)
    assert n_params(model) == 46_160_474
    # TRADES parameter names, so its checkpoints load (strict=False for its unused sub_block1).
    keys = set(model.state_dict())
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.4.conv2.weight", "bn1.weight", "fc.bias"} <= keys
    assert "block1.layer.1.convShortcut.weight" not in keys
    assert len(model.block1.layer) == 5


def test_preact_resnet18_shortcuts_where_shape_changes() -> None:
    model = preact_resnet18()
    with_shortcut = [name for name, m in model.named_modules() if getattr(m, "shortcut", None) is not None]
    assert with_shortcut == ["layer2.0", "layer3.0", "layer4.0"]


# ------------------------------------------------------------------------------------------------
# Forward semantics: an independent functional re-implementation of the official forward
# ------------------------------------------------------------------------------------------------


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return (x - bn.running_mean[None, :, None, None]) / torch.sqrt(
        bn.running_var[None, :, None, None] + bn.eps
    ) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def _reference_preact_forward(model: PreActResNet, x: torch.Tensor) -> torch.Tensor:
    """Official Fast-AT forward (eval mode): out = relu(bn1(x)); shortcut = conv_s(x) or x;
    out = conv2(relu(bn2(conv1(out)))) + shortcut; ...; relu(bn(out)), avg pool, linear."""
    out = F.conv2d(x, model.conv1.weight, padding=1)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            pre = F.relu(_bn(out, block.bn1))
            shortcut = out
            if block.shortcut is not None:
                shortcut = F.conv2d(out, block.shortcut[0].weight, stride=block.conv1.stride)
            h = F.conv2d(pre, block.conv1.weight, stride=block.conv1.stride, padding=1)
            h = F.conv2d(F.relu(_bn(h, block.bn2)), block.conv2.weight, padding=1)
            out = h + shortcut
    out = F.relu(_bn(out, model.bn))
    out = out.mean(dim=(2, 3))  # avg_pool2d(out, 4) on 32x32 inputs
    return out @ model.linear.weight.T + model.linear.bias


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def test_preact_resnet_matches_official_forward() -> None:
    torch.manual_seed(0)
    model = PreActResNet([1, 1, 1, 1], num_classes=7).double().eval()
    with torch.no_grad():
        _randomize_bn(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_preact_forward(model, x))


@pytest.mark.parametrize(
    "make, shape, n_classes",
    [
        (lambda: preact_resnet18(num_classes=10), (1, 3, 32, 32), 10),
        (lambda: PreActResNet([1, 1, 1, 1], num_classes=100, in_channels=1), (2, 1, 32, 32), 100),
        (lambda: WideResNet(depth=16, widen_factor=2, num_classes=100), (2, 3, 32, 32), 100),
        (lambda: SmallCNN(num_classes=10, in_channels=1), (2, 1, 28, 28), 10),
        (lambda: SmallCNN(num_classes=10, in_channels=1), (2, 1, 8, 8), 10),
        (lambda: SmallCNN(num_classes=5, in_channels=3), (2, 3, 32, 32), 5),
    ],
)
def test_output_shapes(make, shape: tuple, n_classes: int) -> None:
    model = make().eval()
    with torch.no_grad():
        out = model(torch.rand(shape))
    assert out.shape == (shape[0], n_classes)
    assert torch.isfinite(out).all()


def test_wide_resnet_block_count_and_depth_check() -> None:
    model = WideResNet(depth=22, widen_factor=1)
    assert [len(s.layer) for s in (model.block1, model.block2, model.block3)] == [3, 3, 3]
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=20)


def test_double_backward_through_models() -> None:
    """Fast-BAT differentiates an input gradient w.r.t. the weights: every model must allow it."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(3))
    for model, shape in [
        (nn.Sequential(PreActBlock(4, 8, stride=2), PreActBlock(8, 8), head), (2, 4, 8, 8)),
        (WideResNet(depth=10, widen_factor=1), (2, 3, 16, 16)),
        (SmallCNN(), (2, 1, 8, 8)),
    ]:
        x = torch.rand(shape, requires_grad=True)
        loss = F.cross_entropy(model(x), torch.tensor([0, 1]), reduction="sum")
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        weight = next(model.parameters())
        (gw,) = torch.autograd.grad(gx.square().sum(), weight)
        assert torch.isfinite(gw).all() and gw.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Normalized wrapper and factory
# ------------------------------------------------------------------------------------------------


def test_normalized_equals_manual_normalization() -> None:
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3).eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    model = Normalized(net, mean, std)
    x = torch.rand(4, 3, 12, 12)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        # replay: the wrapper does the same two elementwise ops on the same (1, C, 1, 1) statistics
        torch.testing.assert_close(model(x), net(manual), rtol=0, atol=0)
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    assert {"mean", "std"} <= set(model.state_dict())
    assert model.model is net
    # Buffers follow dtype / device moves.
    assert model.double().mean.dtype == torch.float64


def test_normalized_gradient_is_scaled_by_std() -> None:
    net = nn.Conv2d(2, 1, 1, bias=False)
    model = Normalized(net, (0.5, 0.1), (0.5, 0.25))
    x = torch.rand(1, 2, 3, 3, requires_grad=True)
    model(x).sum().backward()
    expected = net.weight.detach().view(1, 2, 1, 1) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    torch.testing.assert_close(x.grad, expected.expand_as(x))


def test_normalized_scalar_stats_and_validation() -> None:
    model = Normalized(nn.Identity(), 0.5, 0.25, channels=3)
    assert model.mean.shape == (1, 3, 1, 1)
    torch.testing.assert_close(model(torch.ones(1, 3, 2, 2)), torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(ValueError, match="positive"):
        Normalized(nn.Identity(), 0.0, (1.0, 0.0))
    with pytest.raises(ValueError, match="per-channel"):
        Normalized(nn.Identity(), (0.1, 0.2), (1.0, 1.0), channels=3)


def test_build_model_names_and_errors() -> None:
    model = build_model("preact_resnet18", 10, 3, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert isinstance(model, Normalized) and isinstance(model.model, PreActResNet)
    assert n_params(model) == 11_172_170
    assert isinstance(build_model("PreAct-ResNet18", 10, 3, 0.5, 0.2).model, PreActResNet)
    assert isinstance(build_model("prn18", 10, 3, 0.5, 0.2).model, PreActResNet)
    wrn = build_model("wide_resnet", 100, 3, 0.5, 0.2, depth=16, widen_factor=2)
    assert isinstance(wrn.model, WideResNet) and wrn.model.fc.out_features == 100
    cnn = build_model("small_cnn", 10, 1, 0.1307, 0.3081)
    assert cnn.mean.shape == (1, 1, 1, 1)
    assert cnn(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError) as err:
        build_model("resnet50", 10, 3, 0.5, 0.2)
    for name in MODELS:
        assert name in str(err.value)
