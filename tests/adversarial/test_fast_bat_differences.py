"""Fast-BAT with the implicit gradient by differences (``FastBAT(products=...)``): the exact step's gradient
on a smooth model in float64, BatchNorm statistics as the exact step's, no double backward, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from applications.adversarial.config import QUICKSTART, ConfigError, load_config
from applications.adversarial.methods import PRODUCTS, FastBAT, OptionError, build_method


def smooth_net(batchnorm: bool = False) -> nn.Module:
    """A tiny SiLU CNN (smooth, so differences converge to the exact product), optionally with BatchNorm."""
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    layers += [nn.BatchNorm2d(4)] if batchnorm else []
    layers += [nn.SiLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def step_grads(model: nn.Module, method: FastBAT, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
    """One training step's loss and parameter gradients (the generator fixes the random start)."""
    model.zero_grad()
    loss, _ = method.loss(model, x, y, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def rel(a, b):
    num = sum(float((u - v).norm() ** 2) for u, v in zip(a, b)) ** 0.5
    return num / sum(float(v.norm() ** 2) for v in b) ** 0.5


def ig_term(model, x, y, products, eps):
    """The implicit term alone: the gradient with lam=10 minus the one without it (lam=inf)."""
    with_ig = step_grads(model, FastBAT(eps=eps, products=products), x, y)[1]
    without = step_grads(model, FastBAT(eps=eps, lam=float("inf")), x, y)[1]
    return [a - b for a, b in zip(with_ig, without)]


@pytest.fixture
def batch():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    return x, torch.randint(0, 3, (6,))


@pytest.mark.parametrize("products,tol", [(bl.CentralDifference(), 1e-8), (bl.ForwardDifference(), 1e-6)])
def test_differenced_step_is_the_exact_step_in_float64(batch, products, tol):
    """Same value, and the implicit term within the differences' error (float64, smooth model)."""
    x, y = batch
    torch.manual_seed(1)
    model = smooth_net().double()
    eps = 0.1
    loss_exact, g_exact = step_grads(model, FastBAT(eps=eps), x, y)
    loss_fd, g_fd = step_grads(model, FastBAT(eps=eps, products=products), x, y)
    assert torch.equal(loss_fd, loss_exact)  # replay: the products change the backward only, not the forward
    ig_exact, ig_fd = ig_term(model, x, y, bl.Exact(), eps), ig_term(model, x, y, products, eps)
    assert rel(ig_fd, ig_exact) < tol
    assert rel(ig_exact, g_exact) > 1e-4  # the term is not negligible: the check above tests something
    assert rel(g_fd, g_exact) < tol


@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("products", [bl.CentralDifference(), bl.ForwardDifference()])
def test_batchnorm_statistics_as_the_exact_step(batch, products, update):
    """The differenced backward re-runs the model; the running statistics still end as the exact step's
    (update_bn_on_attack False: only the training forward updates them; True: four updates, as the official code)."""
    x, y = batch
    torch.manual_seed(2)
    exact_model = smooth_net(batchnorm=True).double().train()
    fd_model = smooth_net(batchnorm=True).double().train()
    fd_model.load_state_dict(exact_model.state_dict())
    _, g_exact = step_grads(exact_model, FastBAT(eps=0.1, update_bn_on_attack=update), x, y)
    _, g_fd = step_grads(fd_model, FastBAT(eps=0.1, update_bn_on_attack=update, products=products), x, y)
    bn_exact, bn_fd = exact_model[1], fd_model[1]
    assert int(bn_fd.num_batches_tracked) == int(bn_exact.num_batches_tracked) == (4 if update else 1)
    assert torch.allclose(bn_fd.running_mean, bn_exact.running_mean, rtol=0, atol=1e-14)
    assert torch.allclose(bn_fd.running_var, bn_exact.running_var, rtol=0, atol=1e-14)
    assert rel(g_fd, g_exact) < 1e-5


def test_no_double_backward_and_the_pass_count(batch):
    """requires_double_backward is False with differences; the step runs when double backward raises."""
    assert FastBAT(eps=0.1).requires_double_backward
    assert not FastBAT(eps=0.1, lam=float("inf")).requires_double_backward
    for products in (bl.CentralDifference(), bl.ForwardDifference()):
        assert not FastBAT(eps=0.1, products=products).requires_double_backward

    class NoDoubleBackward(torch.autograd.Function):
        """SiLU whose backward is not differentiable (as a fused kernel without a double backward)."""

        @staticmethod
        def forward(t):
            return F.silu(t)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            s = torch.sigmoid(t)
            return g * s * (1 + t * (1 - s))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 8), nn.Linear(8, 3)
            self.calls = 0

        def forward(self, t):
            self.calls += 1
            return self.b(NoDoubleBackward.apply(self.a(t.flatten(1))))

    x, y = batch
    model = Net().double()
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|requires grad"):
        step_grads(model, FastBAT(eps=0.1), x, y)
    for products, passes in ((bl.ForwardDifference(), 4), (bl.CentralDifference(), 5)):
        model.calls = 0
        _, grads = step_grads(model, FastBAT(eps=0.1, products=products), x, y)
        assert model.calls == passes  # the docstring's forward passes per step
        assert all(torch.isfinite(g).all() for g in grads)


def test_products_option_from_python_and_yaml():
    for name, cls in (("exact", bl.Exact), ("forward", bl.ForwardDifference), ("central", bl.CentralDifference)):
        assert type(build_method("fast_bat", eps=0.1, products=name).products) is cls
        assert type(PRODUCTS[name]()) is cls
    scaled = bl.CentralDifference(scale=0.01)
    assert build_method("fast_bat", eps=0.1, products=scaled).products is scaled
    with pytest.raises(OptionError, match="products must be one of exact, forward, central, got 'fwd'"):
        build_method("fast_bat", eps=0.1, products="fwd")
    with pytest.raises(OptionError, match="products must be bilevel.Exact()"):
        FastBAT(eps=0.1, products=bl.CentralDifference)
    cfg = load_config(QUICKSTART, ["method.products=forward", "train.compile=true"])
    assert cfg.method.options["products"] == "forward" and cfg.train.compile
    with pytest.raises(ConfigError, match=r"method.products: expected exact \| forward \| central, got 'centrl' "
                                          r"\(did you mean 'central'\?\)"):
        load_config(QUICKSTART, ["method.products=centrl"])
    with pytest.raises(ConfigError, match="needs double backward.*method.products=forward"):
        load_config(QUICKSTART, ["train.compile=true"])
