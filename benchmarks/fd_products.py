r"""Fast-BAT's implicit gradient by double backward vs by differences of first-order gradients.

The implicit-gradient (IG) term of Fast-BAT (Zhang et al., 2022) at a linearization point :math:`z` is

.. math::

    \mathrm{IG} = \frac{\mathrm{d}}{\mathrm{d}\theta}\big\langle \nabla_\delta \ell_{atk}(\theta, z), u\big\rangle,
    \qquad u = -\tfrac{1}{\lambda} H_C\, \nabla_\delta \ell_{tr}(\theta, \delta^\star),

and the step's whole gradient is :math:`\nabla_\theta \ell_{tr}(\theta, \delta^\star) + \mathrm{IG}`. Both are
computed through the library path: :class:`bilevel.Linearized` (``step = 5000/255``, ``lam`` 10 or
``None`` = ``1/step``) on the attack problem :math:`\min_{\delta \in C} -\sum_i \mathrm{CE}`, with
``products=`` :class:`bilevel.Exact`, :class:`bilevel.CentralDifference` or :class:`bilevel.ForwardDifference`
(the step rule's ``h``). The IG term alone is ``torch.autograd.grad(delta_star, params, v)`` with
:math:`v = \nabla_\delta \ell_{tr}` at the detached :math:`\delta^\star`, so it is not the small difference
of two large gradients.

Accuracy, per model and precision (float64, float32, bf16 autocast on the float32 model): the IG term's
relative error and the whole gradient's cosine, each against the exact variant in the same precision and
against the exact variant in float64 (the second shows the precision's own floor). Inputs, weights and
:math:`z` (one projected gradient step from a uniform start, computed in float64) are the same in every
precision.

Time (float32, and bf16 autocast): one Fast-BAT step ``z`` (one input-gradient pass from a uniform
start), :math:`\delta^\star`, the training forward and ``loss.backward()``, for each variant, next to
Fast-BAT without IG (``lam = inf``) and Fast-AT (a sign step, no IG); timed round-robin (see
:mod:`benchmarks.common`). The backward pass runs outside autocast.

Step sweep (lam = 10, float64 and float32): the IG term's error with the rule's step times 0.01 ... 100
(``CentralDifference(scale=...)``), to locate the best step against the rule's.

Models, built here from plain ``torch.nn`` (random initialization, BatchNorm in train mode with momentum
0 so that repeated passes leave it unchanged): the small CNN of the adversarial app on 1x28x28 images
(batch 128), the same CNN made smooth (SiLU, average pooling: accuracy only, to separate the effect of
ReLU and max-pool kinks from rounding), and a PreActResNet-18 of base width 16 (the original: 64) on
3x32x32 images (batch 32). Random images and labels; eps = 8/255.

Run: ``python benchmarks/fd_products.py`` (CPU, about 10 minutes on 2 cores), ``--tiny`` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, machine_info, markdown_table, time_interleaved, write_json  # noqa: E402

EPS = 8.0 / 255
ATTACK_STEP = 5000.0 / 255
VARIANTS: Dict[str, bl.Products] = {"exact": bl.Exact(), "central": bl.CentralDifference(),
                                    "forward": bl.ForwardDifference()}


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def small_cnn(in_channels: int = 1, width: int = 32, hidden: int = 128, classes: int = 10,
              smooth: bool = False) -> nn.Module:
    """The adversarial app's SmallCNN layout: conv3x3(w), conv3x3(2w), maxpool, 4x4 average pool, fc, fc.

    ``smooth=True``: SiLU instead of ReLU and average instead of max pooling (no kinks).
    """
    act = nn.SiLU if smooth else nn.ReLU
    return nn.Sequential(
        Normalize(0.1307, 0.3081),
        nn.Conv2d(in_channels, width, 3, padding=1), act(),
        nn.Conv2d(width, 2 * width, 3, padding=1), act(),
        nn.AvgPool2d(2) if smooth else nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * width * 16, hidden), act(), nn.Linear(hidden, classes),
    )


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + short


def preact_resnet18(width: int = 16, in_channels: int = 3, classes: int = 10) -> nn.Module:
    """PreActResNet-18 (blocks 2-2-2-2, widths w, 2w, 4w, 8w; the original has w = 64)."""
    layers: List[nn.Module] = [Normalize(0.47, 0.25), nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)]
    cin = width
    for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for j in range(2):
            layers.append(PreActBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def model_specs(tiny: bool) -> Dict[str, Dict[str, Any]]:
    if tiny:
        return {"small_cnn": {"build": lambda: small_cnn(width=4, hidden=16), "shape": (1, 12, 12), "batch": 8}}
    return {
        "small_cnn": {"build": small_cnn, "shape": (1, 28, 28), "batch": 128},
        "small_cnn_smooth": {"build": lambda: small_cnn(smooth=True), "shape": (1, 28, 28), "batch": 128},
        "preact_resnet18_w16": {"build": preact_resnet18, "shape": (3, 32, 32), "batch": 32},
    }


def attack_lower(model: nn.Module, x: Tensor, y: Tensor, solver: Optional[bl.Solver] = None) -> bl.LowerProblem:
    """min over C of -sum_i CE(model(x_i + delta_i), y_i), C = {|delta|_inf <= eps} ∩ {0 <= x + delta <= 1}."""
    def objective(params: Dict[str, Tensor], delta: Tensor) -> Tensor:
        return -F.cross_entropy(functional_call(model, params, (x + delta,)), y, reduction="sum")

    constraint = bl.LInfBall(0.0, EPS, check=False) & bl.Box(-x, 1.0 - x, check=False)
    return bl.LowerProblem(objective, constraint=constraint, solver=solver)


def setup(spec: Dict[str, Any], seed: int = 0) -> Tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A float64 model, images, labels, uniform start z0 and linearization point z (float64)."""
    torch.manual_seed(seed)
    model = spec["build"]().double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # repeated passes leave the running statistics unchanged
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(spec["batch"], *spec["shape"], generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (spec["batch"],), generator=gen)
    z0 = bl.Box(-x, 1 - x).project((2 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 1) * EPS)
    lower = attack_lower(model, x, y, bl.ProjectedGradient(step_size=ATTACK_STEP, steps=1))
    z = bl.solve(lower, dict(model.named_parameters()), z0, bl.FirstOrder())
    return model, x, y, z0, z


def ig_and_direct(model: nn.Module, x: Tensor, y: Tensor, z: Tensor, lam: Optional[float], products: bl.Products,
                  amp: bool) -> Tuple[Tensor, Tensor]:
    """(IG term, direct term) of Fast-BAT's gradient, each flattened over the parameters."""
    params = dict(model.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        delta = bl.solve(attack_lower(model, x, y), params, z, bl.Linearized(ATTACK_STEP, lam=lam, products=products),
                         check_finite=False)
        d = delta.detach().requires_grad_()
        loss = F.cross_entropy(model(x + d), y)
    v, *direct = torch.autograd.grad(loss, [d, *params.values()])
    ig = torch.autograd.grad(delta, list(params.values()), v)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts]).double()  # noqa: E731
    return flat(ig), flat(direct)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def accuracy(name: str, spec: Dict[str, Any], lams: List[Optional[float]], precisions: List[str]) -> List[Dict]:
    model64, x64, y, _, z64 = setup(spec)
    rows = []
    for lam in lams:
        ref_ig, ref_direct = ig_and_direct(model64, x64, y, z64, lam, bl.Exact(), amp=False)
        ref = ref_ig + ref_direct
        for precision in precisions:
            dtype = torch.float64 if precision == "float64" else torch.float32
            model = model64 if dtype == torch.float64 else _copy(model64, dtype)
            x, z = x64.to(dtype), z64.to(dtype)
            amp = precision == "bf16_autocast"
            same_ig, same_direct = ig_and_direct(model, x, y, z, lam, bl.Exact(), amp)
            for variant, products in VARIANTS.items():
                ig, direct = (same_ig, same_direct) if variant == "exact" else ig_and_direct(model, x, y, z, lam,
                                                                                           products, amp)
                rows.append({
                    "model": name, "precision": precision, "lam": "1/step" if lam is None else lam, "variant": variant,
                    "ig_rel_err_vs_exact_same_precision": rel(ig, same_ig),
                    "ig_rel_err_vs_exact_float64": rel(ig, ref_ig),
                    "grad_cosine_vs_exact_same_precision": cosine(ig + direct, same_ig + same_direct),
                    "grad_cosine_vs_exact_float64": cosine(ig + direct, ref),
                    "ig_norm_over_direct_norm": float(ig.norm() / direct.norm()),
                })
    return rows


def sweep(name: str, spec: Dict[str, Any], scales: List[float]) -> List[Dict]:
    """The IG term's relative error (lam = 10) against the float64 exact one, with the rule's step times ``scale``."""
    model64, x64, y, _, z64 = setup(spec)
    ref, _ = ig_and_direct(model64, x64, y, z64, 10.0, bl.Exact(), amp=False)
    rows = []
    for dtype in (torch.float64, torch.float32):
        model = model64 if dtype == torch.float64 else _copy(model64, dtype)
        for variant, cls in [("central", bl.CentralDifference), ("forward", bl.ForwardDifference)]:
            for scale in scales:
                ig, _ = ig_and_direct(model, x64.to(dtype), y, z64.to(dtype), 10.0, cls(scale=scale), amp=False)
                rows.append({"model": name, "precision": str(dtype).replace("torch.", ""), "variant": variant,
                             "scale": scale, "ig_rel_err_vs_exact_float64": rel(ig, ref)})
    return rows


def _copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy
    return copy.deepcopy(model).to(dtype)


def make_step(model: nn.Module, x: Tensor, y: Tensor, z0: Tensor, strategy: bl.Strategy, amp: bool) -> Callable:
    """One Fast-BAT (or Fast-AT) step's gradient: z from z0, delta*, training forward, backward."""
    params = dict(model.named_parameters())
    z_lower = attack_lower(model, x, y, bl.ProjectedGradient(step_size=ATTACK_STEP, steps=1))
    lower = attack_lower(model, x, y)
    fast_at = isinstance(strategy, bl.Linearized) and strategy.sign

    def step() -> None:
        for p in params.values():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z = z0 if fast_at else bl.solve(z_lower, params, z0, bl.FirstOrder(), check_finite=False)
            delta = bl.solve(lower, params, z, strategy, check_finite=False)
            loss = F.cross_entropy(model(x + delta), y)
        loss.backward()

    return step


def timing(name: str, spec: Dict[str, Any], precisions: List[str], repeats: int, warmup: int) -> List[Dict]:
    model64, x64, y, z064, _ = setup(spec)
    model = _copy(model64, torch.float32)
    x, z0 = x64.float(), z064.float()
    labels = {"fast_at": bl.Linearized(EPS * 1.25, sign=True), "fast_bat no IG": bl.Linearized(ATTACK_STEP, lam=math.inf)}
    labels.update({f"fast_bat IG {v}": bl.Linearized(ATTACK_STEP, lam=10.0, products=p) for v, p in VARIANTS.items()})
    rows = []
    for precision in precisions:
        amp = precision == "bf16_autocast"
        steps = [make_step(model, x, y, z0, s, amp) for s in labels.values()]
        times = time_interleaved(steps, repeats=repeats, warmup=warmup)
        base = times[0]["median_s"]
        for label, t in zip(labels, times):
            rows.append({"model": name, "precision": precision, "method": label, "median_ms": 1e3 * t["median_s"],
                         "q1_ms": 1e3 * t["q1_s"], "q3_ms": 1e3 * t["q3_s"], "cpu_median_ms": 1e3 * t["cpu_median_s"],
                         "ratio_to_fast_at": t["median_s"] / base, "repeats": t["repeats"]})
    return rows


def bf16_runs() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.conv2d(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 3, 3)).sum()
        return True
    except RuntimeError:
        return False


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fd_products_cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = ["float64", "float32"] + (["bf16_autocast"] if bf16_runs() else [])
    load_start = load_average()
    accuracy_rows, sweep_rows, timing_rows = [], [], []
    for name, spec in model_specs(args.tiny).items():
        accuracy_rows += accuracy(name, spec, [10.0, None], precisions)
        sweep_rows += sweep(name, spec, [0.01, 0.1, 1.0, 10.0, 100.0])
        if name != "small_cnn_smooth":
            timing_rows += timing(name, spec, [p for p in precisions if p != "float64"], args.repeats, args.warmup)
    print(markdown_table(
        ["model", "precision", "lam", "variant", "IG rel. err (same prec.)", "IG rel. err (vs float64)",
         "cos (same prec.)", "cos (vs float64)", "|IG|/|direct|"],
        [[r["model"], r["precision"], r["lam"], r["variant"], r["ig_rel_err_vs_exact_same_precision"],
          r["ig_rel_err_vs_exact_float64"], f'{r["grad_cosine_vs_exact_same_precision"]:.7f}',
          f'{r["grad_cosine_vs_exact_float64"]:.7f}', r["ig_norm_over_direct_norm"]] for r in accuracy_rows]))
    print()
    print(markdown_table(["model", "precision", "variant", "scale", "IG rel. err (vs float64)"],
                         [[r["model"], r["precision"], r["variant"], r["scale"], r["ig_rel_err_vs_exact_float64"]]
                          for r in sweep_rows]))
    print()
    print(markdown_table(["model", "precision", "method", "median ms", "CPU ms", "x Fast-AT"],
                         [[r["model"], r["precision"], r["method"], r["median_ms"], r["cpu_median_ms"],
                           r["ratio_to_fast_at"]] for r in timing_rows]))
    data = {"machine": machine_info("cpu"), "load_average_start": load_start, "load_average_end": load_average(),
            "settings": {"eps": EPS, "attack_step": ATTACK_STEP, "tiny": args.tiny, "repeats": args.repeats,
                         "warmup": args.warmup, "threads": torch.get_num_threads()},
            "accuracy": accuracy_rows, "step_sweep": sweep_rows, "timing": timing_rows}
    write_json(args.out, data)
    print(f"\nwrote {args.out}")
    return data


if __name__ == "__main__":
    main()
