"""Fast-BAT on the vision transformer (``build_model("vit")``), whose attention kernels have no double backward."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from applications.adversarial.attacks import pgd_attack
from applications.adversarial.methods import FastBAT, Standard
from applications.adversarial.models import MODELS, VisionTransformer, build_model
from applications.vision.data import load_dataset

MNIST_VIT = {"image_size": 28, "patch_size": 7, "dim": 32, "depth": 1, "heads": 2}


def test_vit_is_registered():
    assert "vit" in MODELS
    model = build_model("ViT", 10, 1, 0.1307, 0.3081, **MNIST_VIT)
    assert isinstance(model.model, VisionTransformer)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"expected \(B, C, 32, 32\)"):  # MNIST needs image_size=28
        build_model("vit", 10, 1, 0.1307, 0.3081)(torch.rand(3, 1, 28, 28))


def test_exact_implicit_gradient_works_on_the_vit():
    """The exact step keeps its double-backward pass on the math attention kernel, so it runs with the default
    kernels (the CPU flash kernel alone raises "derivative ... not implemented"); in float64 its gradient is
    the central-difference step's."""
    torch.manual_seed(0)
    model = build_model("vit", 10, 1, 0.5, 0.25, image_size=8, patch_size=4, dim=8, depth=1, heads=2).double()
    x, y = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    grads = {}
    for name, products in (("exact", bl.Exact()), ("central", bl.CentralDifference())):
        model.zero_grad()
        loss, _ = FastBAT(eps=0.1, products=products).loss(model, x, y, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float((grads["central"] - grads["exact"]).norm() / grads["exact"].norm()) < 1e-8


def train(method, x, y, epochs=10, batch=64):
    torch.manual_seed(0)
    model = build_model("vit", 10, 1, 0.1307, 0.3081, **MNIST_VIT)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        total = torch.zeros(())
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss, _ = method.loss(model, x[idx], y[idx], generator=gen)
            loss.backward()
            opt.step()
            total += loss.detach()
        losses.append(float(total) / (len(x) // batch))
    return model.eval(), losses


def accuracies(model, x, y, eps):
    delta = pgd_attack(model, x, y, eps, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()), float((model(x + delta).argmax(1) == y).float().mean())


def test_fast_bat_with_differences_trains_the_vit():
    """512 MNIST digits, 10 epochs, PGD-10 at eps 0.1 on 256 test digits: standard training reaches 0.50
    clean and 0.0 robust accuracy; Fast-BAT (forward differences) 0.30 and 0.13 (measured)."""
    torch.set_num_threads(1)
    train_set, test_set = load_dataset("mnist5k")
    x, y = train_set.x[:512].float() / 255, train_set.y[:512]
    xt, yt = test_set.x[:256].float() / 255, test_set.y[:256]
    eps = 0.1
    _, robust_standard = accuracies(train(Standard(), x, y)[0], xt, yt, eps)
    model, losses = train(FastBAT(eps=eps, products=bl.ForwardDifference()), x, y)
    _, robust = accuracies(model, xt, yt, eps)
    assert losses[-1] < losses[0] - 0.3
    assert robust > robust_standard + 0.05
