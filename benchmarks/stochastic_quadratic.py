r"""Stochastic bi-level methods on benchopt's simulated quadratic: ||grad h||^2 and h against wall time.

The problem is benchopt's simulated quadratic drawn by our own generator (:mod:`benchmarks.quadratic_problem`:
32,768 inner and 1,024 outer samples, :math:`z \in \mathbb R^{100}`, :math:`x \in \mathbb R^{10}`, float32,
:math:`z_0 = 0`, :math:`x_0 = -2\cdot\mathbf 1`, mini-batches of 64 drawn with replacement); the metric is the exact
:math:`\|\nabla h(x)\|^2` and :math:`h(x) = f(z^\star(x), x)` in float64, outside the timed region.

Methods: ``bilevel``'s SOBA, F2SA, BOME (single loop, ``method.step`` + torch.optim SGD on x), AmIGO and
StocBiO (strategies for ``bilevel.solve`` over ``TorchOptim`` SGD), and the deterministic ``Implicit(CG)``
(lower problem solved from scratch by full-batch gradient descent at each outer step) and ``Unrolled``.
Each runs for a wall-time budget. Separately, the per-iteration cost of each single-loop method is
measured against a hand-written PyTorch loop of the same algorithm (:mod:`benchmarks.hand_loops`) (same objectives, same autograd
calls, no library, plain update of x), interleaved in one process (target: ratio <= 1.2; medians, CPU medians
and minima over the rounds are recorded, the minimum being the least sensitive to a loaded machine), both with
torch.optim SGD on x (as users run it) and with an in-place update of x, and against an analytic eager
floor (the same SOBA iteration with the quadratic's derivatives written as matrix products, no autograd),
eager and under ``torch.compile``, and bilevel's first-order F2SA step under ``torch.compile``.

Run: ``python benchmarks/stochastic_quadratic.py`` (``--tiny`` for a smoke run). Writes
``benchmarks/results/stochastic_quadratic_cpu.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    load_average,
    machine_info,
    markdown_table,
    time_interleaved,
    write_json,
)
from benchmarks.hand_loops import HAND, analytic_soba  # noqa: E402
from benchmarks.outer_loops import single_loop_iteration, solve_iteration  # noqa: E402
from benchmarks.quadratic_problem import STEPS, make_problem, metrics, samplers, x0, z0  # noqa: E402

# benchopt's JAX timings on a 2-core machine like ours, idle (the numbers): seconds to reach ||grad h||^2 <= target
BENCHOPT_JAX = {"AmIGO": {"1e-2": 1.7, "1e-3": 3.5}, "SOBA": {"1e-2": 3.8, "3e-3": 6.9}}
TARGETS = (1e-2, 3e-3, 1e-3)
PLOT_TITLE = "benchopt's quadratic (CPU, float32, batch 64)"


# ----------------------------------------------------------------------------------------------------------
# The methods: each builder returns (x, one_iteration) for the budget loop
# ----------------------------------------------------------------------------------------------------------
def single_loop(name: str, torch_optim: bool = True):
    """``method.step`` then torch.optim SGD on x (as users run it), or a plain in-place update of x."""

    def build(P, batch: int, seed: int):
        s = STEPS[name]
        inner, outer = samplers(P, batch, seed)
        lower = bl.LowerProblem(P.g)
        if name == "SOBA":
            method, lr = bl.SOBA(lower, P.f, step_size=s["rho"], lower_batches=inner, upper_batches=outer), s["gamma"]
        elif name == "F2SA":
            growth = s["lam_growth"]
            method = bl.F2SA(lower, P.f, step_size=s["rho"], lam=s["lam"], lam_growth=lambda t: growth / (t + 1) ** (1 / 7),
                             lower_batches=inner, upper_batches=outer)
            lr = s["gamma"]
        else:
            method = bl.BOME(lower, P.f, step_size=s["alpha"], outer_step_size=s["xi"], inner_steps=s["inner_steps"],
                             eta=s["eta"], lower_batches=inner, upper_batches=outer)
            lr = s["xi"]
        x = x0(P)
        opt = torch.optim.SGD([x], lr=lr)
        state = method.init(z0(P))

        def iteration_inplace() -> None:
            with torch.no_grad():
                x.sub_(lr * method.step(x, state))

        return x, (single_loop_iteration(method, x, opt, state) if torch_optim else iteration_inplace)

    return build


def solve_then_hypergrad(name: str):
    def build(P, batch: int, seed: int):
        s = STEPS[name]
        inner, outer = samplers(P, batch, seed)
        lower = bl.LowerProblem(P.g, solver=bl.TorchOptim(torch.optim.SGD, s["inner_steps"], batches=inner, lr=s["inner_lr"]))
        cls = bl.AmIGO if name == "AmIGO" else bl.StocBiO
        strategy = cls(inner, steps=s["v_steps"], step_size=s["v_lr"])
        x = x0(P)
        return x, solve_iteration(lower, strategy, P.f, outer, x, torch.optim.SGD([x], lr=s["gamma"]), z0(P))

    return build


def deterministic(name: str):
    def build(P, batch: int, seed: int):
        s = STEPS[name]
        lower = bl.LowerProblem(P.g_full, solver=bl.GradientDescent(s["lower_step"], s["lower_steps"]))
        strategy = bl.Implicit(bl.CG(maxiter=s["cg"])) if name == "Implicit(CG)" else bl.Unrolled()
        x = x0(P)
        opt = torch.optim.SGD([x], lr=s["gamma"])
        start = z0(P)

        def iteration() -> None:  # from scratch: z0 = 0 at every outer step
            P.f_full(x, bl.solve(lower, x, start, strategy, check_finite=False)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return x, iteration

    return build


METHODS: Dict[str, Callable] = {
    "SOBA": single_loop("SOBA"), "F2SA": single_loop("F2SA"), "BOME": single_loop("BOME"),
    "AmIGO": solve_then_hypergrad("AmIGO"), "StocBiO": solve_then_hypergrad("StocBiO"),
    "Implicit(CG)": deterministic("Implicit(CG)"), "Unrolled": deterministic("Unrolled"),
}
# iterations between two evaluations of the metric (not timed)
CHUNK = {"SOBA": 25, "F2SA": 25, "BOME": 5, "AmIGO": 2, "StocBiO": 2, "Implicit(CG)": 1, "Unrolled": 1}


def thin(curve: List[Dict[str, float]], points: int = 120) -> List[Dict[str, float]]:
    """The first logged point in each of ``points`` log-spaced time bins, plus the first and last (the JSON stays small;
    the summaries are computed on the full curve)."""
    if len(curve) <= points:
        return curve
    t_min = max(min(c["time_s"] for c in curve[1:]), 1e-6)
    span = math.log(max(curve[-1]["time_s"], t_min * 1.0001) / t_min)
    kept, seen = [curve[0]], set()
    for c in curve[1:-1]:
        b = int(points * math.log(max(c["time_s"], t_min) / t_min) / span)
        if b not in seen:
            seen.add(b)
            kept.append(c)
    return kept + [curve[-1]]


def run_budget(P, name: str, budget_s: float, batch: int, seed: int,
               iterations: Optional[int] = None) -> Dict[str, Any]:
    """Iterate for ``budget_s`` seconds of (timed) wall time, or for ``iterations`` iterations (rounded up to a
    multiple of CHUNK) whatever the time; log the exact metric every CHUNK iterations."""
    x, iteration = METHODS[name](P, batch, seed)
    curve = [{"time_s": 0.0, "iteration": 0, **metrics(P, x)}]
    elapsed, it = 0.0, 0
    while (elapsed < budget_s) if iterations is None else (it < iterations):
        t0 = time.perf_counter()
        for _ in range(CHUNK[name]):
            iteration()
        elapsed += time.perf_counter() - t0
        it += CHUNK[name]
        m = metrics(P, x)
        curve.append({"time_s": elapsed, "iteration": it, **m})
        if not math.isfinite(m["grad_norm2"]) or m["grad_norm2"] > 1e6:
            break
    reach = {f"{tgt:g}": next((c["time_s"] for c in curve if c["grad_norm2"] <= tgt), None) for tgt in TARGETS}
    return {"method": name, "steps": STEPS[name], "curve": thin(curve), "time_to": reach, "iterations": it,
            "final_grad_norm2": curve[-1]["grad_norm2"], "best_grad_norm2": min(c["grad_norm2"] for c in curve),
            "final_h": curve[-1]["h"], "s_per_iteration": elapsed / max(it, 1)}


# ----------------------------------------------------------------------------------------------------------
# Per-iteration cost: bilevel's single-loop steps against hand-written loops of the same algorithms
# ----------------------------------------------------------------------------------------------------------
def compiled_steps(P, batch: int, seed: int, iters: int, repeats: int) -> Dict[str, Any]:
    """What torch.compile buys: the analytic SOBA step, and bilevel's F2SA step (first order), eager vs compiled.

    bilevel's SOBA step does not compile: its Hessian-vector product is a double backward, which torch.compile's
    AOT autograd does not support (the error is recorded)."""
    out: Dict[str, Any] = {}
    t0 = time.perf_counter()
    contenders = {"analytic SOBA, eager": analytic_soba(P, batch, seed)[1],
                  "analytic SOBA, torch.compile": analytic_soba(P, batch, seed, compile=True)[1]}
    f2sa_inner, f2sa_outer = samplers(P, batch, seed)
    s = STEPS["F2SA"]
    x = {"eager": x0(P).detach(), "compiled": x0(P).detach()}
    for mode in ("eager", "compiled"):
        method = bl.F2SA(bl.LowerProblem(P.g), P.f, step_size=s["rho"], lam=s["lam"], lower_batches=f2sa_inner,
                         upper_batches=f2sa_outer)
        state = method.init(z0(P))
        step = torch.compile(method.step) if mode == "compiled" else method.step

        def iteration(mode=mode, step=step, state=state) -> None:
            x[mode] = x[mode] - s["gamma"] * step(x[mode], state)

        contenders[f"bilevel F2SA step, {'torch.compile' if mode == 'compiled' else 'eager'}"] = iteration
    for fn in contenders.values():  # compile outside the timing
        fn()
    out["compile_s"] = time.perf_counter() - t0
    timings = time_interleaved([(lambda f=f: [f() for _ in range(iters)]) for f in contenders.values()],
                               repeats=repeats, warmup=2)
    out["ms_per_iteration"] = {k: {"median_ms": 1e3 * tm["median_s"] / iters, "cpu_median_ms": 1e3 * tm["cpu_median_s"] / iters,
                                   "min_ms": 1e3 * tm["min_s"] / iters} for k, tm in zip(contenders, timings)}
    try:
        soba = bl.SOBA(bl.LowerProblem(P.g), P.f, lower_batches=f2sa_inner, upper_batches=f2sa_outer)
        torch.compile(soba.step)(x0(P).detach(), soba.init(z0(P)))
        out["bilevel_soba_step_compiles"] = True
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden
        out["bilevel_soba_step_compiles"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for k, v in out["ms_per_iteration"].items():
        print(f"  {k:34s} {v['median_ms']:.3f} ms (CPU {v['cpu_median_ms']:.3f}, min {v['min_ms']:.3f})", flush=True)
    print(f"  bilevel SOBA step under torch.compile: {out['bilevel_soba_step_compiles']}", flush=True)
    return out


def per_iteration_cost(P, batch: int, seed: int, iters: int, repeats: int, warmup: int) -> List[Dict[str, Any]]:
    """Median seconds per iteration of bilevel's step (+ torch.optim SGD on x) vs the hand-written loop, interleaved."""
    rows = []
    for name in ("SOBA", "F2SA", "BOME"):
        n = max(iters // (5 if name == "BOME" else 1), 1)
        contenders = {"bilevel": METHODS[name](P, batch, seed)[1],
                      "bilevel, in-place x update": single_loop(name, torch_optim=False)(P, batch, seed)[1],
                      "hand-written": HAND[name](P, batch, seed)[1]}
        if name == "SOBA":
            contenders["analytic (no autograd)"] = analytic_soba(P, batch, seed)[1]
        fns = [(lambda f=f, n=n: [f() for _ in range(n)]) for f in contenders.values()]
        timings = time_interleaved(fns, repeats=repeats, warmup=warmup)
        per = {k: {key: 1e3 * tm[src] / n for key, src in (("median_ms", "median_s"), ("cpu_median_ms", "cpu_median_s"),
                                                           ("q1_ms", "q1_s"), ("q3_ms", "q3_s"), ("min_ms", "min_s"))}
               for k, tm in zip(contenders, timings)}
        hand, ours, inplace = per["hand-written"], per["bilevel"], per["bilevel, in-place x update"]
        rows.append({"method": name, "iterations_per_repeat": n, "timings": per,
                     "ratio_bilevel_over_hand": ours["median_ms"] / hand["median_ms"],
                     "cpu_ratio_bilevel_over_hand": ours["cpu_median_ms"] / hand["cpu_median_ms"],
                     "min_ratio_bilevel_over_hand": ours["min_ms"] / hand["min_ms"],
                     "ratio_bilevel_inplace_over_hand": inplace["median_ms"] / hand["median_ms"],
                     "min_ratio_bilevel_inplace_over_hand": inplace["min_ms"] / hand["min_ms"]})
        r = rows[-1]
        print(f"  {name:5s} " + "  ".join(f"{k}: {v['median_ms']:.3f} ms (min {v['min_ms']:.3f})" for k, v in per.items())
              + f"  ratio {r['ratio_bilevel_over_hand']:.3f} (CPU {r['cpu_ratio_bilevel_over_hand']:.3f}, min "
              f"{r['min_ratio_bilevel_over_hand']:.3f}; in-place {r['ratio_bilevel_inplace_over_hand']:.3f}, min "
              f"{r['min_ratio_bilevel_inplace_over_hand']:.3f})", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------
def plot(runs: List[Dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the `apps` extra
        print("matplotlib not installed: no plot")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        ts = [max(c["time_s"], 1e-3) for c in r["curve"]]
        ax1.plot(ts, [c["grad_norm2"] for c in r["curve"]], label=r["method"])
        ax2.plot(ts, [c["h"] for c in r["curve"]], label=r["method"])
    for (name, targets), marker in zip(BENCHOPT_JAX.items(), ("x", "+")):
        ax1.plot(list(targets.values()), [float(t) for t in targets], marker=marker, color="k", linestyle="none",
                 markersize=9, label=f"benchopt JAX {name} (issue's timings)")
    ax1.set(xscale="log", yscale="log", xlabel="wall time (s)", ylabel=r"$\|\nabla h(x)\|^2$ (exact)", title=title)
    ax2.set(xscale="log", xlabel="wall time (s)", ylabel="h(x) = f(z*(x), x)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small problem and budgets (smoke test)")
    ap.add_argument("--budget", type=float, default=20.0, help="wall-time seconds per method")
    ap.add_argument("--iterations", type=int, default=None,
                    help="run each method for this many iterations instead of a time budget (load-independent)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=40, help="rounds of the per-iteration cost comparison")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0 keeps torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "stochastic_quadratic_cpu.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing --out JSON")
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads(args.out.read_text(encoding="utf-8"))
        plot(data["runs"], args.out.with_suffix(".png"), PLOT_TITLE)
        return data
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = dict(n_inner=512, n_outer=128, p=20, d=5) if args.tiny else {}
    budget = min(args.budget, 0.5) if args.tiny else args.budget
    batch = 64
    P = make_problem(seed=args.seed, **sizes)
    eig = torch.linalg.eigvalsh(P.reduced_hessian)
    start = torch.full((P.d,), -2.0)
    info = {"n_inner": P.n_inner, "n_outer": P.n_outer, "p": P.p, "d": P.d, "batch": batch, "dtype": "float32",
            "reduced_hessian_eigs": [float(eig.min()), float(eig.max())], "reduced_hessian_cond": float(eig.max() / eig.min()),
            "grad_norm2_at_x0": metrics(P, start)["grad_norm2"], "h_at_x0": metrics(P, start)["h"]}
    print(f"problem: {info}", flush=True)
    results: Dict[str, Any] = {
        "benchmark": "stochastic_quadratic", "machine": machine_info("cpu"), "tiny": args.tiny,
        "note": "the load averages at the start and the end say how busy the machine was during the run",
        "load_average_start": load_average(), "problem": info, "budget_s": budget, "seed": args.seed,
        "benchopt_jax_seconds_to_target": BENCHOPT_JAX, "runs": [],
        "curve_note": "curves thinned to the first point of each of 120 log-spaced time bins; time_to and best/final "
                      "values come from the full curves",
    }
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        r = run_budget(P, name, budget, batch, args.seed, args.iterations)
        results["runs"].append(r)
        print(f"{name:13s} {r['iterations']:6d} it  {1e3 * r['s_per_iteration']:.3f} ms/it  final ||grad h||^2 "
              f"{r['final_grad_norm2']:.3g}  best {r['best_grad_norm2']:.3g}  time to {r['time_to']}", flush=True)
    print("per-iteration cost, bilevel vs hand-written (interleaved):", flush=True)
    results["per_iteration"] = per_iteration_cost(P, batch, args.seed, iters=10 if args.tiny else 50,
                                                  repeats=3 if args.tiny else args.repeats, warmup=1 if args.tiny else 3)
    if not args.no_compile:
        print("torch.compile (compile time not included):", flush=True)
        results["torch_compile"] = compiled_steps(P, batch, args.seed, iters=10 if args.tiny else 50,
                                                  repeats=3 if args.tiny else 20)
    results["load_average_end"] = load_average()
    path = write_json(args.out, results)
    png = plot(results["runs"], args.out.with_suffix(".png"), PLOT_TITLE)
    print()
    print(markdown_table(["method", "ms / iteration", "s to 1e-2", "s to 3e-3", "s to 1e-3", "final ||grad h||^2"],
                         [[r["method"], 1e3 * r["s_per_iteration"], r["time_to"]["0.01"], r["time_to"]["0.003"],
                           r["time_to"]["0.001"], r["final_grad_norm2"]] for r in results["runs"]]))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return results


if __name__ == "__main__":
    main()
