"""What every method shares (methods/base.py, methods/__init__.py): the perturbation sets, the BatchNorm
guard of the attack passes, construction errors, autocast, the number of passes, the attack_model of DDP,
the sharded generator."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _method_oracles import CountingWrapper, batch, bn_state, gen, grads, rel_err, tiny_cnn
from torch import nn

from applications.adversarial.attacks import ShardedGenerator
from applications.adversarial.methods import (
    METHODS,
    Standard,
    bn_stats_frozen,
    build_method,
)


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
    for name in ("fast_at", "fast_bat", "pgd"):
        with pytest.raises(ValueError, match="random_start"):
            build_method(name, eps=0.1, random_start=0)
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
    wrapper = CountingWrapper(model)
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

