"""Oracles for the adversarial training methods: independent reference implementations in float64."""

from __future__ import annotations

import dataclasses
import math
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from applications.adversarial.attacks import ShardedGenerator, uniform_start
from applications.adversarial.methods import (
    METHODS,
    NFGSM,
    PGDAT,
    FastAT,
    FastBAT,
    GradAlign,
    Standard,
    bn_stats_frozen,
    build_method,
    gradient_alignment,
)

DT = torch.float64


def tiny_cnn(bn: bool = True, act: type = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: List[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [act(), nn.Conv2d(4, 4, 3, stride=2, padding=1), act(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)]
    return nn.Sequential(*layers).to(DT)


def batch(n: int = 6, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 5, 5, generator=g, dtype=DT)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.02], dtype=DT)  # pixels on / near the image box
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grads(model: nn.Module) -> List[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def method_grads(method, model: nn.Module, x, y, seed: int = 7) -> List[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = method.loss(model, x, y, generator=gen(seed))
    loss.backward()
    return grads(model)


def rel_err(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    num = sum(float((u - v).pow(2).sum()) for u, v in zip(a, b)) ** 0.5
    den = sum(float(v.pow(2).sum()) for v in b) ** 0.5
    return num / den


def ref_start(x: torch.Tensor, radius: float, seed: int = 7) -> torch.Tensor:
    """Uniform start in [-radius, radius] clipped to 0 <= x + d <= 1, written out."""
    u = torch.rand(x.shape, generator=gen(seed), dtype=x.dtype)
    return torch.clamp(x + (2 * u - 1) * radius, 0.0, 1.0) - x


def input_grad_ce_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    xin = x.detach().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(xin), y, reduction="sum"), xin, create_graph=create_graph)[0]


def bounds(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.maximum(-x, torch.full_like(x, -eps)), torch.minimum(1 - x, torch.full_like(x, eps))


def clip_ball_box(d: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto {|d| <= eps} & {0 <= x + d <= 1} with the combined bounds. (Clipping in two steps,
    clamp(x + clamp(d, -eps, eps), 0, 1) - x, leaves coordinates one rounding error off the bound, so a
    strict-interior mask would then count active coordinates as free: why the official code needs tol 1e-7.)"""
    lo, hi = bounds(x, eps)
    return torch.minimum(torch.maximum(d, lo), hi)


# ---------------------------------------------------------------- Fast-BAT against the paper's eq. (14)

def fast_bat_reference(model: nn.Module, x, y, eps: float, step: float, lam: float, seed: int = 7):
    """theta-grad = grad_theta l_tr(theta, d*) + (d d*/d theta)^T grad_d l_tr(theta, d*),
    d d*/d theta = -(1/lam) grad2_{theta,d} l_atk(theta, z) H_C, l_atk = -CE_sum, l_tr = CE_mean."""
    params = list(model.parameters())
    z0 = ref_start(x, eps, seed)
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


# ---------------------------------------------------------------- Fast-AT, PGD, N-FGSM, perturbation sets

def test_fast_at_is_fgsm_rs() -> None:
    model = tiny_cnn(bn=True)
    x, y = batch()
    eps = 8 / 255
    method = FastAT(eps=eps)
    assert method.step_size == pytest.approx(1.25 * eps)
    got = method.perturbation(model, x, y, generator=gen())
    z0 = ref_start(x, eps)
    ref = clip_ball_box(z0 + 1.25 * eps * input_grad_ce_sum(model, x + z0, y).sign(), x, eps)
    assert not got.requires_grad
    assert torch.allclose(got, ref, rtol=0, atol=1e-15)
    # the training gradient is the plain gradient at the fixed perturbation
    model.zero_grad()
    F.cross_entropy(model(x + ref), y).backward()
    assert rel_err(method_grads(method, model, x, y), grads(model)) < 1e-12


def test_uniform_start_formula() -> None:
    x, _ = batch()
    assert torch.allclose(uniform_start(x, 0.1, gen(3)), ref_start(x, 0.1, 3), rtol=0, atol=1e-15)


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


@pytest.mark.parametrize("name", sorted(METHODS))
def test_perturbations_inside_the_sets(name: str) -> None:
    model = tiny_cnn(bn=True)
    x, y = batch(n=8)
    x[1] = 0.0
    x[2] = 1.0
    eps = 8 / 255
    method = build_method(name, eps=eps)
    d = method.perturbation(model, x, y, generator=gen()).detach()
    radius = 3 * eps if name == "n_fgsm" else eps
    assert float(d.abs().max()) <= radius + 1e-12
    assert float((x + d).min()) >= 0.0 and float((x + d).max()) <= 1.0
    if name not in ("standard", "n_fgsm"):
        assert float(d.abs().max()) == pytest.approx(eps)  # the attack reaches the sphere somewhere


# ---------------------------------------------------------------- GradAlign

def test_grad_align_regularizer_gradient_vs_finite_differences() -> None:
    model = tiny_cnn(bn=False, act=nn.Tanh)
    x, y = batch()
    noise = (2 * torch.rand(x.shape, generator=gen(5), dtype=DT) - 1) * 0.1
    params = list(model.parameters())
    g_clean_fixed = input_grad_ce_sum(model, x, y).flatten(1)

    for clean_graph in (True, False):
        model.zero_grad()
        gradient_alignment(model, x, y, noise, clean_grad_graph=clean_graph).backward()
        got = grads(model)

        def reg_value(clean_graph: bool = clean_graph) -> float:
            gc = input_grad_ce_sum(model, x, y).flatten(1) if clean_graph else g_clean_fixed
            gn = input_grad_ce_sum(model, x + noise, y).flatten(1)
            return float(1 - F.cosine_similarity(gc, gn, dim=1, eps=0).mean())

        h = 1e-6
        for p, gp in zip(params, got):
            for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
                old = p.data[idx].item()
                p.data[idx] = old + h
                up = reg_value()
                p.data[idx] = old - h
                down = reg_value()
                p.data[idx] = old
                fd = (up - down) / (2 * h)
                assert gp[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # the clean gradient's own derivative matters: the two variants differ
    model.zero_grad()
    gradient_alignment(model, x, y, noise, clean_grad_graph=True).backward()
    full = grads(model)
    model.zero_grad()
    gradient_alignment(model, x, y, noise, clean_grad_graph=False).backward()
    assert rel_err(grads(model), full) > 1e-3


def test_grad_align_skips_samples_with_zero_input_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).to(DT)
    x = torch.rand(3, 1, 2, 2, dtype=DT) + 0.1
    x[0] = -1.0  # ReLU kills every input of sample 0: its input gradients are exactly zero
    y = torch.tensor([0, 1, 2])
    noise = torch.full_like(x, 0.05)
    reg = gradient_alignment(model, x, y, noise)
    gc, gn = input_grad_ce_sum(model, x, y).flatten(1), input_grad_ce_sum(model, x + noise, y).flatten(1)
    assert float(gc[0].abs().sum()) == 0.0
    ref = 1 - F.cosine_similarity(gc[1:], gn[1:], dim=1).mean()
    assert float(reg.detach()) == pytest.approx(float(ref), abs=1e-14)


def test_grad_align_method_gradient() -> None:
    model = tiny_cnn(bn=False, act=nn.Tanh)
    x, y = batch()
    eps = 0.05
    method = GradAlign(eps=eps, ga_coef=0.7)
    assert GradAlign(eps=8 / 255).ga_coef == 0.2 and GradAlign(eps=16 / 255).ga_coef == 2.0
    got = method_grads(method, model, x, y)
    # independent: FGSM from zero with step eps, then CE + coef * (1 - cos) with the clean gradient constant
    d = clip_ball_box(eps * input_grad_ce_sum(model, x, y).sign(), x, eps)
    noise = (2 * torch.rand(x.shape, generator=gen(), dtype=DT) - 1) * eps
    gc = input_grad_ce_sum(model, x, y).flatten(1)
    gn = input_grad_ce_sum(model, x + noise, y, create_graph=True).flatten(1)
    loss = F.cross_entropy(model(x + d), y) + 0.7 * (1 - F.cosine_similarity(gc, gn, dim=1).mean())
    model.zero_grad()
    loss.backward()
    assert rel_err(got, grads(model)) < 1e-10


# ---------------------------------------------------------------- BatchNorm statistics

def bn_state(model: nn.Module) -> List[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers()]


def test_bn_stats_frozen_context_is_exact() -> None:
    model = tiny_cnn(bn=True)
    x, _ = batch()
    bn = model[1]
    bn.momentum = 0.5
    before = bn_state(model)
    with bn_stats_frozen(model):
        out_frozen = model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(model)))
    assert bn.track_running_stats
    out = model(x)  # ordinary train-mode forward: same batch statistics, buffers updated
    assert torch.equal(out, out_frozen)
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, before[0])
    # eval mode: running statistics used, untouched
    model.eval()
    with bn_stats_frozen(model):
        assert torch.equal(model(x), model(x))
    # restored on exceptions
    model.train()
    with pytest.raises(RuntimeError), bn_stats_frozen(model):
        raise RuntimeError("boom")
    assert bn.track_running_stats


@pytest.mark.parametrize("name", ["fast_at", "fast_bat", "pgd", "grad_align", "n_fgsm"])
def test_attack_passes_do_not_touch_bn_stats(name: str) -> None:
    x, y = batch()
    results = {}
    for update in (False, True):
        model = tiny_cnn(bn=True)
        model.train()
        before = bn_state(model)
        extra = {"ga_coef": 0.2} if name == "grad_align" else {}
        method = build_method(name, eps=0.05, update_bn_on_attack=update, **extra)
        loss, _ = method.loss(model, x, y, generator=gen())
        loss.backward()
        results[update] = (int(model[1].num_batches_tracked), grads(model))
        if not update:
            # exactly one update: the training forward; replay it from the initial buffers
            replay = tiny_cnn(bn=True)
            replay.train()
            replay(x + method.perturbation(replay, x, y, generator=gen()).detach())
            assert all(torch.equal(a, b) for a, b in zip(bn_state(model), bn_state(replay)))
            assert not all(torch.equal(a, b) for a, b in zip(bn_state(model), before))
    assert results[False][0] == 1
    assert results[True][0] > 1
    # attack passes use batch statistics either way, so the gradient does not depend on the option
    assert rel_err(results[True][1], results[False][1]) < 1e-12


# ---------------------------------------------------------------- construction, errors, autocast

def test_build_method_errors() -> None:
    with pytest.raises(ValueError, match="valid methods: fast_at, fast_bat, grad_align, n_fgsm, pgd, standard"):
        build_method("trades", eps=8 / 255)
    with pytest.raises(TypeError, match="unknown option.*lamda.*valid options: eps, attack_step"):
        build_method("fast_bat", eps=8 / 255, lamda=10)
    with pytest.raises(TypeError, match="missing required option.*eps"):
        build_method("fast_at")
    for bad in (-0.1, 1.5, float("nan"), True, "8/255"):
        with pytest.raises(ValueError, match="eps must be a number"):
            build_method("pgd", eps=bad)
    with pytest.raises(ValueError, match="eps"):
        build_method("fast_at", eps=0.0)
    with pytest.raises(ValueError, match="steps"):
        build_method("pgd", eps=0.1, steps=0)
    with pytest.raises(ValueError, match="lam"):
        build_method("fast_bat", eps=0.1, lam=0.0)
    with pytest.raises(ValueError, match="update_bn_on_attack"):
        build_method("fast_at", eps=0.1, update_bn_on_attack="yes")
    assert isinstance(build_method("standard"), Standard)
    for name, cls in METHODS.items():
        assert cls.name == name and dataclasses.is_dataclass(cls)
        assert "eps" in [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_under_bf16_autocast_match_float32(name: str) -> None:
    """bf16 autocast (train.amp=bf16) gives the float32 gradient up to bf16 rounding, channels_last exactly."""
    model = tiny_cnn(bn=True).float()
    x, y = batch()
    x = x.float()
    method = build_method(name, eps=8 / 255, **({"lam": None} if name == "fast_bat" else {}))

    def gradient(amp: bool, channels_last: bool = False) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        m = model.to(memory_format=torch.channels_last) if channels_last else model.to(memory_format=torch.contiguous_format)
        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, logits = method.loss(m, xx, y, generator=torch.Generator().manual_seed(5))
        loss.backward()
        assert logits.shape == (x.shape[0], 3) and loss.dtype == torch.float32
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    ref, bf16, cl = gradient(False), gradient(True), gradient(False, channels_last=True)
    assert bool(torch.isfinite(bf16).all())
    cosine = float(torch.nn.functional.cosine_similarity(bf16, ref, dim=0))
    # PGD's signed steps and GradAlign's cosine of two input gradients amplify bf16 rounding (measured
    # 0.978 and 0.949 here; the one-step methods 0.985 .. 0.99999)
    floor = {"pgd": 0.95, "grad_align": 0.9}.get(name, 0.98)
    assert cosine > floor, f"{name}: bf16 gradient cosine {cosine:.4f} to float32"
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, forwards", [("standard", 1), ("fast_at", 2), ("fast_bat", 3), ("pgd", 4), ("n_fgsm", 2),
                                            ("grad_align", 3)])  # GradAlign: FGSM reuses the clean input gradient
def test_number_of_forward_passes(name: str, forwards: int) -> None:
    """The cost floor: e.g. Fast-BAT = one input-gradient pass to z, one gradient at z kept for the double
    backward, one training pass (no second forward at x + delta*)."""
    model = tiny_cnn(bn=True)
    x, y = batch()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    options = {"steps": 3} if name == "pgd" else {}
    loss, _ = build_method(name, eps=8 / 255, **options).loss(model, x, y)
    loss.backward()
    assert len(calls) == forwards


def test_grad_align_default_coefficient_only_at_published_radii() -> None:
    assert build_method("grad_align", eps=8 / 255).ga_coef == 0.2
    assert build_method("grad_align", eps=16 / 255).ga_coef == 2.0
    with pytest.raises(ValueError, match="no published ga_coef"):
        build_method("grad_align", eps=10 / 255)
    assert build_method("grad_align", eps=10 / 255, ga_coef=0.5).ga_coef == 0.5


def test_fast_bat_lam_zero_points_to_lam_none() -> None:
    with pytest.raises(ValueError, match="pass lam=None"):
        build_method("fast_bat", eps=8 / 255, lam=0)


class _Wrapper(nn.Module):
    """Stands for the DDP wrapper: forwards to ``module`` (same parameter tensors) and counts its calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(x)


_ATTACK_MODEL_CASES = [("standard", {}), ("fast_at", {}), ("fast_bat", {"lam": None}), ("fast_bat", {"lam": 10.0}),
                       ("pgd", {"steps": 3}), ("n_fgsm", {}), ("grad_align", {"ga_coef": 0.5}),
                       ("grad_align", {"ga_coef": 0.5, "random_start": True, "clean_grad_graph": True})]


@pytest.mark.parametrize("name, options", _ATTACK_MODEL_CASES)
def test_attack_model_sharing_parameters_gives_the_same_gradient(name: str, options: dict) -> None:
    """``loss(wrapper, x, y, attack_model=module)`` (the trainer's DDP call) equals ``loss(module, x, y)``:
    same loss, same logits, same total gradient in ``.grad`` (implicit and regularizer terms included),
    and only the training forward goes through the wrapper."""
    method = build_method(name, eps=0.1, **options)
    model = tiny_cnn(bn=False, act=nn.Tanh)  # smooth: the double-backward terms are non-zero
    x, y = batch()
    model.zero_grad(set_to_none=True)
    ref_loss, ref_logits = method.loss(model, x, y, generator=gen())
    ref_loss.backward()
    ref = grads(model)
    wrapper = _Wrapper(model)
    model.zero_grad(set_to_none=True)
    loss, logits = method.loss(wrapper, x, y, generator=gen(), attack_model=model)
    loss.backward()
    assert wrapper.calls == 1
    assert torch.equal(loss.detach(), ref_loss.detach()) and torch.equal(logits.detach(), ref_logits.detach())
    for a, b in zip(grads(model), ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)
    # the same module object as attack_model is the default path
    model.zero_grad(set_to_none=True)
    method.loss(model, x, y, generator=gen(), attack_model=model)[0].backward()
    assert all(torch.equal(a, b) for a, b in zip(grads(model), ref))


def test_attack_model_carries_the_fast_bat_implicit_term() -> None:
    """The implicit term reaches ``.grad`` through ``attack_model``: with the exact implicit gradient the
    result differs from the first-order one (lam = inf) by more than rounding."""
    model = tiny_cnn(bn=False, act=nn.Tanh)
    x, y = batch()
    out = []
    for lam in (None, math.inf):
        model.zero_grad(set_to_none=True)
        loss, _ = FastBAT(eps=0.1, attack_step=0.05, lam=lam).loss(_Wrapper(model), x, y, generator=gen(),
                                                                   attack_model=model)
        loss.backward()
        out.append(grads(model))
    assert max((a - b).abs().max().item() for a, b in zip(*out)) > 1e-6


@pytest.mark.parametrize("name, options", [("fast_at", {}), ("fast_bat", {"lam": None}), ("pgd", {"steps": 2}),
                                           ("n_fgsm", {}), ("grad_align", {"ga_coef": 0.5, "random_start": True})])
def test_sharded_generator_gives_each_rank_its_rows_of_the_global_draw(name: str, options: dict) -> None:
    """Rank r of W holding the strided rows ``[r::W]`` gets exactly those rows of the single-process
    perturbation (the per-sample attack of a BatchNorm-free model; float64)."""
    method = build_method(name, eps=0.1, **options)
    model = tiny_cnn(bn=False)
    x, y = batch(n=6)
    full = method.perturbation(model, x, y, generator=gen()).detach()
    world = 3
    for r in range(world):
        part = method.perturbation(model, x[r::world], y[r::world],
                                   generator=ShardedGenerator(gen(), r, world)).detach()
        assert torch.allclose(part, full[r::world], rtol=0, atol=1e-12), r
    with pytest.raises(ValueError, match="rank"):
        ShardedGenerator(gen(), 3, 3)


def test_requires_double_backward_is_an_attribute_of_each_method() -> None:
    """Exactly the losses that differentiate an input gradient build a second-order graph."""
    x, y = batch()
    cases = [("standard", {}, False), ("fast_at", {}, False), ("pgd", {"steps": 2}, False), ("n_fgsm", {}, False),
             ("fast_bat", {}, True), ("fast_bat", {"lam": None}, True), ("fast_bat", {"lam": math.inf}, False),
             ("grad_align", {"ga_coef": 0.2}, True), ("grad_align", {"ga_coef": 0.0}, False)]
    for name, options, expected in cases:
        method = build_method(name, eps=0.05, **options)
        assert method.requires_double_backward is expected, (name, options)
        model = tiny_cnn(bn=False)
        loss, _ = method.loss(model, x, y, generator=gen())
        # a double backward shows as a grad_fn that is itself a backward node (e.g. ...BackwardBackward)
        nodes, seen, stack = [], set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nodes.append(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
        assert any("BackwardBackward" in n for n in nodes) is expected, (name, options, sorted(set(nodes)))
