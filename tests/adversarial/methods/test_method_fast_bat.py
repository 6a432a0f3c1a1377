"""Fast-BAT (methods/fast_bat.py) against the paper's eq. (14) and its options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _method_oracles import (
    CountingWrapper,
    batch,
    bounds,
    clip_ball_box,
    gen,
    grads,
    input_grad_ce_sum,
    method_grads,
    ref_start,
    rel_err,
    tiny_cnn,
)
from torch import nn

from applications.adversarial.methods import (
    FastBAT,
    build_method,
)


def fast_bat_reference(model: nn.Module, x, y, eps: float, step: float, lam: float, seed: int = 7,
                       zero_start: bool = False):
    """theta-grad = grad_theta l_tr(theta, d*) + (d d*/d theta)^T grad_d l_tr(theta, d*),
    d d*/d theta = -(1/lam) grad2_{theta,d} l_atk(theta, z) H_C, l_atk = -CE_sum, l_tr = CE_mean."""
    params = list(model.parameters())
    z0 = torch.zeros_like(x) if zero_start else ref_start(x, eps, seed)
    z = clip_ball_box(z0 + step * input_grad_ce_sum(model, x + z0, y), x, eps)  # non-sign step, no graph
    zr = z.clone().requires_grad_(True)
    l_atk = -F.cross_entropy(model(x + zr), y, reduction="sum")
    g_z = torch.autograd.grad(l_atk, zr, create_graph=True)[0]
    u = z - step * g_z.detach()
    d_star = clip_ball_box(u, x, eps)
    lo, hi = bounds(x, eps)
    H = ((u > lo) & (u < hi)).to(x.dtype)  # strictly inside C
    dr = d_star.clone().requires_grad_(True)
    l_tr = F.cross_entropy(model(x + dr), y)
    direct = torch.autograd.grad(l_tr, params + [dr], retain_graph=False)
    g_direct, v = list(direct[:-1]), direct[-1]
    ig = torch.autograd.grad((g_z * (H * v)).sum(), params)
    total = [gd - gi / lam for gd, gi in zip(g_direct, ig)]
    return total, g_direct, H, ig


@pytest.mark.parametrize("lam_option", ["exact", "decoupled"])
@pytest.mark.parametrize("mask_tol", [None, 0.0])
def test_fast_bat_gradient_equals_eq14(lam_option: str, mask_tol) -> None:
    model = tiny_cnn(bn=True)
    model.train()
    x, y = batch()
    eps, step = 0.1, 4.0
    lam = 1.0 / step if lam_option == "exact" else 10.0
    method = FastBAT(eps=eps, attack_step=step, lam=None if lam_option == "exact" else 10.0, mask_tol=mask_tol)
    assert method.z_step == step
    got = method_grads(method, model, x, y)
    ref, direct, H, ig = fast_bat_reference(model, x, y, eps, step, lam)
    # the test must be able to fail: a real share of free coordinates and a visible implicit term
    assert 0.1 < float(H.mean()) < 0.9
    ig_norm = sum(float(t.pow(2).sum()) for t in ig) ** 0.5 / lam
    assert ig_norm > 1e-3 * sum(float(t.pow(2).sum()) for t in direct) ** 0.5
    assert rel_err(got, ref) < 1e-10
    assert rel_err(got, direct) > 1e-3


def test_fast_bat_zero_start_equals_eq14_from_zero() -> None:
    """``random_start=False``: z is one step from z0 = 0, and the gradient is eq. (14) there (not at a uniform z0)."""
    model = tiny_cnn(bn=True)
    model.train()
    x, y = batch()
    method = FastBAT(eps=0.1, attack_step=4.0, lam=10.0, random_start=False)
    got = method_grads(method, model, x, y)
    ref, _, _, _ = fast_bat_reference(model, x, y, 0.1, 4.0, 10.0, zero_start=True)
    uniform, _, _, _ = fast_bat_reference(model, x, y, 0.1, 4.0, 10.0)
    assert rel_err(got, ref) < 1e-10
    assert rel_err(got, uniform) > 1e-3
    # the generator is not consumed: any seed gives the same perturbation
    a = method.perturbation(model, x, y, generator=gen(1)).detach()
    assert torch.equal(a, method.perturbation(model, x, y, generator=gen(2)).detach())


def test_fast_bat_lam_inf_is_the_detached_gradient() -> None:
    model = tiny_cnn(bn=True)
    model.train()
    x, y = batch()
    method = FastBAT(eps=0.1, attack_step=4.0, lam=math.inf)
    delta = method.perturbation(model, x, y, generator=gen())
    assert not delta.requires_grad  # no second-order graph at all
    got = method_grads(method, model, x, y)
    _, direct, _, _ = fast_bat_reference(model, x, y, 0.1, 4.0, 1.0)
    assert rel_err(got, direct) < 1e-12


def test_fast_bat_defaults_and_official_preset() -> None:
    m = FastBAT(eps=8 / 255)
    assert m.attack_step == pytest.approx(5000 / 255) and m.z_step == m.attack_step and m.lam == 10.0
    assert FastBAT(eps=16 / 255).attack_step == pytest.approx(2000 / 255)
    o = FastBAT.official(eps=8 / 255)
    assert (o.lam, o.mask_tol, o.update_bn_on_attack) == (10.0, 1e-7, True)
    assert FastBAT.official(eps=8 / 255, lam=None).lam is None


def test_fast_bat_mask_tol_drops_near_bound_coordinates() -> None:
    """With a large tolerance the implicit term only sees coordinates deep inside C (reference with that mask)."""
    model = tiny_cnn(bn=False)
    x, y = batch()
    eps, step, tol = 0.1, 4.0, 0.03
    got = method_grads(FastBAT(eps=eps, attack_step=step, lam=None, mask_tol=tol), model, x, y)
    ref_all, direct, H, ig = fast_bat_reference(model, x, y, eps, step, 1 / step)
    # recompute the reference with the tolerance mask
    params = list(model.parameters())
    z0 = ref_start(x, eps)
    z = clip_ball_box(z0 + step * input_grad_ce_sum(model, x + z0, y), x, eps)
    zr = z.clone().requires_grad_(True)
    g_z = torch.autograd.grad(-F.cross_entropy(model(x + zr), y, reduction="sum"), zr, create_graph=True)[0]
    d_star = clip_ball_box(z - step * g_z.detach(), x, eps)
    lo, hi = bounds(x, eps)
    H_tol = ((d_star > lo + tol) & (d_star < hi - tol)).to(x.dtype)
    assert float(H_tol.sum()) < float(H.sum())
    dr = d_star.clone().requires_grad_(True)
    v = torch.autograd.grad(F.cross_entropy(model(x + dr), y), dr)[0]
    ig_tol = torch.autograd.grad((g_z * (H_tol * v)).sum(), params)
    ref = [gd - step * gi for gd, gi in zip(direct, ig_tol)]
    assert rel_err(got, ref) < 1e-10
    assert rel_err(got, ref_all) > 1e-6


def test_fast_bat_official_step_saturates_and_stays_finite() -> None:
    model = tiny_cnn(bn=True)
    x, y = batch()
    method = FastBAT(eps=8 / 255)
    d = method.perturbation(model, x, y, generator=gen())
    assert d.requires_grad
    assert bool(torch.isfinite(torch.stack([g.norm() for g in method_grads(method, model, x, y)])).all())


def test_fast_bat_lam_zero_points_to_lam_none() -> None:
    with pytest.raises(ValueError, match="pass lam=None"):
        build_method("fast_bat", eps=8 / 255, lam=0)


def test_attack_model_carries_the_fast_bat_implicit_term() -> None:
    """The implicit term reaches ``.grad`` through ``attack_model``: with the exact implicit gradient the
    result differs from the first-order one (lam = inf) by more than rounding."""
    model = tiny_cnn(bn=False, act=nn.Tanh)
    x, y = batch()
    out = []
    for lam in (None, math.inf):
        model.zero_grad(set_to_none=True)
        loss, _ = FastBAT(eps=0.1, attack_step=0.05, lam=lam).loss(CountingWrapper(model), x, y, generator=gen(),
                                                                   attack_model=model)
        loss.backward()
        out.append(grads(model))
    assert max((a - b).abs().max().item() for a, b in zip(*out)) > 1e-6

