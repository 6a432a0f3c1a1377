r"""Cost of one adversarial-training step per method, on the same model and batch, in one run.

A step is ``optimizer.zero_grad(); loss, _ = method.loss(model, x, y); loss.backward(); optimizer.step()``
(SGD, momentum 0.9, weight decay 5e-4, model in train mode) with the methods of
:mod:`applications.adversarial.methods` at eps = 8/255:

* ``standard``, ``fast_at`` (FGSM-RS), ``n_fgsm``, ``grad_align``, ``pgd-2``, ``pgd-10``;
* ``fast_bat`` five ways: the exact implicit gradient (``lam = 1/attack_step``), the official ``lam = 10``,
  no implicit gradient (``lam = inf``), and the implicit gradient by forward and by central differences of
  gradients (``products: forward`` / ``central``, ``lam = 1/attack_step``; 4 and 5 forward+backward passes);
* ``fast_bat (official pass sequence)``: a re-implementation of the official code's step (Zhang et al., ICML 2022):
  ``create_graph`` on the first input-gradient step, the forward at :math:`x + \delta^\star` run twice (once
  for :math:`\nabla_\delta \ell`, once for the direct gradient), BatchNorm statistics updated on every pass,
  and the implicit term added to ``p.grad`` by hand;
* ``fast_bat exact, backward(inputs=params)``: our exact Fast-BAT with the backward restricted to the
  weights (a diagnostic: it skips the gradient that autograd otherwise accumulates into the linearization
  point :math:`z`, a leaf that requires grad inside :class:`bilevel.Linearized`).

Reported per method: the median wall-clock time of a step (and the median process CPU time; all methods
timed round-robin, see :mod:`benchmarks.common`), the ratio to ``fast_at``, and the peak memory of a step:
on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step; on CPU the peak
resident set size of one step above the resident size just before it, in a fresh subprocess per method
(the kernel's high-water mark VmHWM, reset through ``/proc/self/clear_refs``), or ``null`` with ``--no-memory``.

Models: the small CNN on 28x28 grey images (batch 128), PreActResNet-18 on 32x32 RGB images (batch 128 on
CUDA, 32 on CPU). Random data (cost does not depend on the pixel values).

Run: ``python benchmarks/step_cost.py`` (CPU) or ``python benchmarks/step_cost.py --device cuda``;
``--tiny`` for a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from applications.adversarial.methods import build_method  # noqa: E402
from applications.adversarial.models import build_model, use_lean_batchnorm  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    load_average,
    machine_info,
    markdown_table,
    time_interleaved,
    write_json,
)

EPS = 8.0 / 255
OFFICIAL_ATTACK_LR = 5000.0 / 255  # the official attack_lr for eps <= 8/255 (summed attack loss)

StepFn = Callable[[], None]
MEMORY_CPU = ("peak RSS of one step (VmHWM after clear_refs) above the RSS before it, after one warm-up step, "
              "fresh subprocess per method, glibc mmap threshold 64 KiB so freed tensors leave the RSS")


# ----------------------------------------------------------------------------------------------------------
# The official code's Fast-BAT pass sequence (Zhang et al., ICML 2022), re-implemented
# ----------------------------------------------------------------------------------------------------------

def official_style_fast_bat_grads(model: nn.Module, x: Tensor, y: Tensor, eps: float = EPS,
                                  attack_lr: float = OFFICIAL_ATTACK_LR, lam: float = 10.0, mask_tol: float = 1e-7,
                                  generator: Optional[torch.Generator] = None) -> Tensor:
    r"""The official code's Fast-BAT gradient, with its sequence of passes (and its wasted work); leaves the
    full gradient (direct + implicit) in ``p.grad`` and returns the training loss.

    1. :math:`z_0 \sim U(-\epsilon, \epsilon)` clipped to the box; input gradient of the summed CE at
       :math:`z_0` **with** ``create_graph`` (never used); :math:`z` = ascent step, clipped to the ball,
       then :math:`x + z` to [0, 1].
    2. Input gradient at :math:`z` with ``create_graph`` (kept for the implicit term);
       :math:`\delta^\star` = the same step from :math:`z`, clipped in two steps; mask of coordinates
       strictly inside by more than ``mask_tol``.
    3. Forward at :math:`x + \delta^\star` and :math:`\nabla_\delta \ell_{tr}`; the implicit term
       :math:`\tfrac1\lambda \nabla_\theta \langle \nabla_\delta \ell_{atk}(\theta, z), H_C \nabla_\delta \ell_{tr}\rangle`
       by a double backward.
    4. A second forward at :math:`x + \delta^\star` and ``backward`` for the direct gradient (``.grad`` is
       zeroed first); the implicit term is added to ``p.grad`` by hand.

    BatchNorm layers update their running statistics on all four forwards (the model stays in its mode).
    The random start draws ``torch.rand(x.shape, generator=generator)`` like
    :func:`applications.adversarial.attacks.uniform_start`, so with the same generator state it matches
    ``FastBAT.official(eps)`` exactly (a test checks the gradients agree).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    z0 = ((x + (2.0 * u - 1.0) * eps).clamp(0.0, 1.0) - x).requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(model(x + z0), y, reduction="sum"), z0, create_graph=True)
    z = (z0 + attack_lr * g0).clamp(-eps, eps)
    z = ((x + z).clamp(0.0, 1.0) - x).detach().requires_grad_(True)
    del g0
    (g1,) = torch.autograd.grad(F.cross_entropy(model(x + z), y, reduction="sum"), z, create_graph=True)
    delta = (z + attack_lr * g1).clamp(-eps, eps)
    delta = ((x + delta).clamp(0.0, 1.0) - x).detach()
    mask = (delta.abs() < eps - mask_tol) & (x + delta > mask_tol) & (x + delta < 1.0 - mask_tol)
    d = delta.clone().requires_grad_(True)
    (gd,) = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)
    implicit = torch.autograd.grad(g1, params, grad_outputs=mask.to(gd.dtype) * gd / lam, allow_unused=True)
    for p in params:
        p.grad = None
    loss = F.cross_entropy(model(x + delta), y)
    loss.backward()
    with torch.no_grad():
        for p, ig in zip(params, implicit):
            if ig is not None:
                p.grad.add_(ig)
    return loss.detach()


def official_style_fast_bat_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                                 **kwargs: Any) -> None:
    """One optimizer step on :func:`official_style_fast_bat_grads`."""
    official_style_fast_bat_grads(model, x, y, **kwargs)
    optimizer.step()


# ----------------------------------------------------------------------------------------------------------
# Methods and models
# ----------------------------------------------------------------------------------------------------------

#: label -> (build_method name, options, how the step calls backward)
METHOD_SPECS: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "standard": ("standard", {}, "backward"),
    "fast_at": ("fast_at", {"eps": EPS}, "backward"),
    "fast_bat exact IG (lam=1/step)": ("fast_bat", {"eps": EPS, "lam": None}, "backward"),
    "fast_bat official lam=10": ("fast_bat", {"eps": EPS, "lam": 10.0}, "backward"),
    "fast_bat no IG (lam=inf)": ("fast_bat", {"eps": EPS, "lam": math.inf}, "backward"),
    "fast_bat forward-difference IG (lam=1/step)": ("fast_bat", {"eps": EPS, "lam": None, "products": "forward"},
                                                    "backward"),
    "fast_bat central-difference IG (lam=1/step)": ("fast_bat", {"eps": EPS, "lam": None, "products": "central"},
                                                    "backward"),
    "fast_bat official pass sequence": ("official", {}, "official"),
    "fast_bat exact, backward(inputs=params)": ("fast_bat", {"eps": EPS, "lam": None}, "inputs"),
    "pgd-2": ("pgd", {"eps": EPS, "steps": 2}, "backward"),
    "pgd-10": ("pgd", {"eps": EPS, "steps": 10}, "backward"),
    "grad_align": ("grad_align", {"eps": EPS}, "backward"),
    "n_fgsm": ("n_fgsm", {"eps": EPS}, "backward"),
}

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def model_specs(device: str, tiny: bool) -> Dict[str, Dict[str, Any]]:
    """name -> {builder kwargs, input shape, batch}."""
    if tiny:
        return {"small_cnn": {"model": ("small_cnn", 10, 1, 0.5, 0.5, {"width": 4, "hidden": 16}),
                              "shape": (1, 12, 12), "batch": 8}}
    return {
        "small_cnn": {"model": ("small_cnn", 10, 1, 0.1307, 0.3081, {}), "shape": (1, 28, 28), "batch": 128},
        "preact_resnet18": {"model": ("preact_resnet18", 10, 3, CIFAR_MEAN, CIFAR_STD, {}), "shape": (3, 32, 32),
                            "batch": 128 if device.startswith("cuda") else 32},
    }


def make_setup(spec: Dict[str, Any], device: str, seed: int = 0, channels_last: bool = False,
               lean_bn: bool = False):
    name, classes, channels, mean, std, options = spec["model"]
    torch.manual_seed(seed)
    model = build_model(name, classes, channels, mean, std, **options).to(device).train()
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.rand(spec["batch"], *spec["shape"], generator=gen).to(device)
    y = torch.randint(0, classes, (spec["batch"],), generator=gen).to(device)
    if lean_bn:
        model = use_lean_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, y


AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16}


def make_step(label: str, model: nn.Module, x: Tensor, y: Tensor, amp: str = "none") -> StepFn:
    """A closure running one training step of ``label`` (its own SGD optimizer over the shared model).

    ``amp="bf16"``: the forward and attack passes run under ``torch.autocast(bfloat16)`` (as ``train.amp=bf16``
    does in the trainer); the backward and the optimizer step stay outside it.
    """
    name, options, mode = METHOD_SPECS[label]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = AMP_DTYPES[amp]

    def autocast() -> Any:
        return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)

    if mode == "official":
        def official_step() -> None:
            with autocast():
                official_style_fast_bat_step(model, optimizer, x, y)
        return official_step
    method = build_method(name, **options)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = method.loss(model, x, y)
        if mode == "inputs":
            loss.backward(inputs=params)
        else:
            loss.backward()
        optimizer.step()
    return step


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------

def cuda_peak_mib(step: StepFn, device: str) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _proc_status_mib(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_peak_child(model_name: str, label: str, tiny: bool) -> Dict[str, Any]:
    """In this (fresh) process: the peak resident memory of one step of ``label`` above the resident
    memory just before it (after one warm-up step), from the kernel's VmHWM reset through
    /proc/self/clear_refs; where that is unavailable, the increase of ``ru_maxrss`` (then often 0: the
    peak of the imports hides the step's)."""
    spec = model_specs("cpu", tiny)[model_name]
    model, x, y = make_setup(spec, "cpu")
    step = make_step(label, model, x, y)
    step()
    gc.collect()
    before = _proc_status_mib("VmRSS")
    if before is not None and _reset_peak_rss():
        step()
        peak = _proc_status_mib("VmHWM")
        return {"base_mib": before, "peak_increase_mib": max(peak - before, 0.0), "how": "VmHWM after clear_refs"}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    step()
    return {"base_mib": base, "peak_increase_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base,
            "how": "ru_maxrss"}


def cpu_peak_subprocess(model_name: str, label: str, tiny: bool) -> Optional[float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", model_name, label,
           "--threads", str(torch.get_num_threads())]
    if tiny:
        cmd.append("--tiny")
    # Large blocks through mmap (returned to the OS when freed), so that the resident size follows the live
    # allocations instead of glibc's cached heap; without this the measured peaks vary by 4x between
    # methods that allocate the same tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0:
        print(f"  memory child failed for {label}: {out.stderr[-400:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_increase_mib"]


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------

def run_model(model_name: str, spec: Dict[str, Any], labels: List[str], device: str, repeats: int, warmup: int,
              memory: bool, tiny: bool, amp: str = "none", channels_last: bool = False,
              lean_bn: bool = False) -> Dict[str, Any]:
    model, x, y = make_setup(spec, device, channels_last=channels_last, lean_bn=lean_bn)
    steps = [make_step(label, model, x, y, amp) for label in labels]
    timings = time_interleaved(steps, repeats=repeats, warmup=warmup, device=device)
    ref = {k: timings[labels.index("fast_at")][k] for k in ("median_s", "cpu_median_s")}
    rows = []
    for label, step, t in zip(labels, steps, timings):
        mem = None
        if memory:
            mem = cuda_peak_mib(step, device) if device.startswith("cuda") else cpu_peak_subprocess(model_name, label, tiny)
        rows.append({"method": label, "median_ms": 1e3 * t["median_s"], "q1_ms": 1e3 * t["q1_s"], "q3_ms": 1e3 * t["q3_s"],
                     "cpu_median_ms": 1e3 * t["cpu_median_s"], "ratio_to_fast_at": t["median_s"] / ref["median_s"],
                     "cpu_ratio_to_fast_at": t["cpu_median_s"] / ref["cpu_median_s"], "peak_mem_mib": mem,
                     "repeats": t["repeats"]})
        print(f"  {label:42s} {rows[-1]['median_ms']:10.2f} ms  x{rows[-1]['ratio_to_fast_at']:.2f} "
              f"(cpu x{rows[-1]['cpu_ratio_to_fast_at']:.2f})  mem {mem}", flush=True)
    return {"model": model_name, "input_shape": list(spec["shape"]), "batch": spec["batch"],
            "params": sum(p.numel() for p in model.parameters()), "rows": rows, "targets": targets(rows)}


def targets(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The cost targets, on wall-clock and CPU-time medians."""
    by = {r["method"]: r for r in rows}
    out: Dict[str, Any] = {}
    checks = [("exact_ig_over_fast_at", "fast_bat exact IG (lam=1/step)", "fast_at", 2.2),
              ("exact_ig_over_official_sequence", "fast_bat exact IG (lam=1/step)", "fast_bat official pass sequence", 0.8),
              ("no_ig_over_fast_at", "fast_bat no IG (lam=inf)", "fast_at", 1.6),
              ("forward_difference_ig_over_fast_at", "fast_bat forward-difference IG (lam=1/step)", "fast_at", 1.7),
              ("central_difference_ig_over_fast_at", "fast_bat central-difference IG (lam=1/step)", "fast_at", 1.7)]
    for key, num, den, limit in checks:
        if num in by and den in by:
            wall = by[num]["median_ms"] / by[den]["median_ms"]
            cpu = by[num]["cpu_median_ms"] / by[den]["cpu_median_ms"]
            out[key] = {"wall": wall, "cpu": cpu, "target_max": limit, "met_wall": wall <= limit, "met_cpu": cpu <= limit}
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default=None, help="comma list (default: all)")
    ap.add_argument("--methods", default=None, help="comma list of method labels (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and batch (smoke test)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none",
                    help="autocast dtype of the forward and attack passes (bf16: as train.amp=bf16)")
    ap.add_argument("--channels-last", action="store_true", help="model and batch in torch.channels_last")
    ap.add_argument("--lean-bn", action="store_true",
                    help="the models' BatchNorm2d layers replaced by the lean double-backward one (use_lean_batchnorm)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: 1 on CPU, torch's default on CUDA; 0 keeps torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/step_cost_<device>.json")
    ap.add_argument("--update-memory", type=Path, default=None, metavar="JSON",
                    help="only (re)measure the CPU peak memory of every row of an existing results file")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = args.threads if args.threads is not None else (0 if args.device.startswith("cuda") else 1)
    if threads:
        torch.set_num_threads(threads)
    if args.memory_child:
        print(json.dumps(cpu_peak_child(args.memory_child[0], args.memory_child[1], args.tiny)))
        return {}
    if args.update_memory:
        data = json.loads(args.update_memory.read_text())
        for entry in data["models"]:
            for row in entry["rows"]:
                row["peak_mem_mib"] = cpu_peak_subprocess(entry["model"], row["method"], data.get("tiny", False))
                print(f"  {entry['model']:16s} {row['method']:42s} {row['peak_mem_mib']} MiB", flush=True)
        data["memory"] = MEMORY_CPU
        write_json(args.update_memory, data)
        return data
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("step_cost: --device cuda requested but torch.cuda.is_available() is False")
    specs = model_specs(device, args.tiny)
    if args.models:
        specs = {k: specs[k] for k in args.models.split(",")}
    labels = list(METHOD_SPECS) if not args.methods else args.methods.split(",")
    unknown = [m for m in labels if m not in METHOD_SPECS]
    if unknown or "fast_at" not in labels:
        raise SystemExit(f"step_cost: unknown methods {unknown} (fast_at is required); valid: {list(METHOD_SPECS)}")
    # CPU peak memory is measured in fresh subprocesses, which build the default float32 model only
    cpu_variant = args.amp != "none" or args.channels_last or args.lean_bn
    memory = not args.no_memory and (device.startswith("cuda") or not cpu_variant)
    results: Dict[str, Any] = {
        "benchmark": "step_cost",
        "machine": machine_info(device),
        "eps": EPS,
        "protocol": f"median of {args.repeats} steps after {args.warmup} warm-up steps per method, all methods "
                    "round-robin in one process on the same model and batch",
        "memory": (None if not memory else "torch.cuda.max_memory_allocated minus allocated before the step"
                   if device.startswith("cuda") else MEMORY_CPU),
        "tiny": args.tiny,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "batchnorm": "applications.adversarial.models.BatchNorm2d" if args.lean_bn else "torch.nn.BatchNorm2d",
        "load_average_start": load_average(),
        "models": [],
    }
    for name, spec in specs.items():
        print(f"\n== {name}: batch {spec['batch']} x {spec['shape']} on {device}", flush=True)
        entry = run_model(name, spec, labels, device, args.repeats, args.warmup, memory, args.tiny,
                          args.amp, args.channels_last, args.lean_bn)
        results["models"].append(entry)
        print()
        print(markdown_table(["method", "median ms", "x fast_at", "CPU ms", "CPU x fast_at", "peak MiB"],
                             [[r["method"], r["median_ms"], r["ratio_to_fast_at"], r["cpu_median_ms"],
                               r["cpu_ratio_to_fast_at"], r["peak_mem_mib"]] for r in entry["rows"]]))
        for key, t in entry["targets"].items():
            print(f"  target {key}: wall {t['wall']:.2f} cpu {t['cpu']:.2f} (<= {t['target_max']}): "
                  f"{'met' if t['met_wall'] else 'MISSED'} (wall) / {'met' if t['met_cpu'] else 'MISSED'} (cpu)")
    results["load_average_end"] = load_average()
    variant = (("" if args.amp == "none" else f"_{args.amp}") + ("_channels_last" if args.channels_last else "")
               + ("_lean_bn" if args.lean_bn else ""))
    out = args.out or RESULTS_DIR / f"step_cost_{device.split(':')[0]}{variant}.json"
    print(f"\nwrote {write_json(out, results)}")
    return results


if __name__ == "__main__":
    main()
