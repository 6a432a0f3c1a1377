r"""Where the time of a Fast-BAT step goes: per-operator self time of Fast-AT, Fast-BAT without and with the
implicit gradient, from the PyTorch profiler.

The exact implicit gradient costs its double backward: the training backward runs on through the graph of
:math:`\nabla_\delta g(\theta, z)`. Per convolution that is the derivative of the input-gradient
convolution (``aten::_convolution_double_backward``: one convolution for the tangent, one for the weight),
then a full backward at :math:`z` for the curvature of the loss (``aten::convolution_backward``); per
BatchNorm in training mode PyTorch's composite double backward. This script shows, per operator, the
time per step of the three methods and the difference the implicit term makes, so the claims in the docs
("the rest is the double backward itself") come with their measurement.

Run: ``python benchmarks/step_profile.py`` (CPU, one thread, ~3 min on 2 cores);
``--models small_cnn`` for the quick one; ``--device cuda`` on a GPU. Writes
``results/step_profile_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, write_json  # noqa: E402
from benchmarks.step_cost import make_setup, make_step, model_specs  # noqa: E402

LABELS = ["fast_at", "fast_bat no IG (lam=inf)", "fast_bat exact IG (lam=1/step)"]


def profile_steps(label: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                  device: str) -> Dict[str, Dict[str, float]]:
    """Operator -> {ms per step (self time, device time on CUDA), calls per step}."""
    step = make_step(label, model, x, y)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    out: Dict[str, Dict[str, float]] = {}
    for event in prof.key_averages():
        if device.startswith("cuda"):  # torch < 2.4 names it self_cuda_time_total
            self_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            self_us = event.self_cpu_time_total
        if self_us > 0:
            out[event.key] = {"ms_per_step": self_us / 1e3 / steps, "calls_per_step": event.count / steps}
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=None, help="comma list (default: small_cnn,preact_resnet18)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per method (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=12, help="operators in the printed table")
    ap.add_argument("--tiny", action="store_true", help="tiny model and batch (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    specs = model_specs(args.device, args.tiny)
    if args.models:
        specs = {k: specs[k] for k in args.models.split(",")}
    results: Dict[str, Any] = {"benchmark": "step_profile", "machine": machine_info(args.device), "tiny": args.tiny,
                               "time": "self device time" if args.device.startswith("cuda") else "self CPU time",
                               "steps": args.steps, "models": []}
    for name, spec in specs.items():
        model, x, y = make_setup(spec, args.device)
        per = {label: profile_steps(label, model, x, y, args.steps, args.device) for label in LABELS}
        totals = {label: sum(v["ms_per_step"] for v in ops.values()) for label, ops in per.items()}
        fast_at, no_ig, exact = (per[label] for label in LABELS)
        keys = sorted(set(exact) | set(no_ig),
                      key=lambda k: -(exact.get(k, {}).get("ms_per_step", 0.0) - no_ig.get(k, {}).get("ms_per_step", 0.0)))
        rows = []
        for k in keys:
            e, n, a = (d.get(k, {"ms_per_step": 0.0, "calls_per_step": 0.0}) for d in (exact, no_ig, fast_at))
            rows.append({"op": k, "exact_ms": e["ms_per_step"], "exact_calls": e["calls_per_step"],
                         "no_ig_ms": n["ms_per_step"], "no_ig_calls": n["calls_per_step"], "fast_at_ms": a["ms_per_step"],
                         "implicit_term_ms": e["ms_per_step"] - n["ms_per_step"]})
        entry = {"model": name, "batch": spec["batch"], "totals_ms": totals,
                 "implicit_term_ms": totals[LABELS[2]] - totals[LABELS[1]],
                 "ratios_to_fast_at": {label: totals[label] / totals["fast_at"] for label in LABELS}, "ops": rows}
        results["models"].append(entry)
        print(f"\n== {name}, batch {spec['batch']} ({results['time']} per step)")
        print(markdown_table(["op", "exact IG ms (calls)", "no IG ms (calls)", "Fast-AT ms", "IG term ms"],
                             [[r["op"][:48], f"{r['exact_ms']:.1f} ({r['exact_calls']:g})",
                               f"{r['no_ig_ms']:.1f} ({r['no_ig_calls']:g})", f"{r['fast_at_ms']:.1f}",
                               f"{r['implicit_term_ms']:.1f}"] for r in rows[: args.top]]))
        print("totals (ms/step): " + ", ".join(f"{k} {v:.1f} (x{entry['ratios_to_fast_at'][k]:.2f})" for k, v in totals.items()))
    out = args.out or RESULTS_DIR / f"step_profile_{args.device.split(':')[0]}.json"
    print(f"\nwrote {write_json(out, results)}")
    return results


if __name__ == "__main__":
    main()
