r"""Hypergradient accuracy and cost on per-feature ridge regression, against Betty, TorchOpt and a hand-written baseline.

The problem (per-feature ridge, docs/concepts/bilevel.md): upper variable :math:`\lambda \in \mathbb{R}^d_{>0}`
(one penalty per feature),

.. math::

    w^\star(\lambda) = \arg\min_w\ g(\lambda, w) = \tfrac12\|Xw - y\|^2 + \tfrac12 \sum_i \lambda_i w_i^2
                     = (X^\top X + \mathrm{diag}\,\lambda)^{-1} X^\top y,

    F(\lambda) = f(w^\star) = \tfrac12 \|X_v w^\star - y_v\|^2, \qquad
    \frac{\partial F}{\partial \lambda_i} = -w^\star_i\,\big[H^{-1} X_v^\top (X_v w^\star - y_v)\big]_i,
    \quad H = X^\top X + \mathrm{diag}\,\lambda.

Every method receives the same exact lower solution :math:`w^\star` and returns :math:`\mathrm{d}F/\mathrm{d}\lambda`;
we report its relative error :math:`\|\hat g - g\|/\|g\|` against the float64 closed form and the median
wall-clock time of one hypergradient (the upper value, the linear solve on Hessian-vector products and the
final mixed product; for Unrolled also the K differentiable lower steps it needs).

Problems: ``small`` (d = 100, n = 2000; columns scaled so that cond(H) ~ 1e2) and ``large`` (d = 10,000,
n = 1000, where Hessian-vector products dominate; the oracle uses the Woodbury identity, so no d x d matrix
is ever formed). Methods: ``bilevel`` Implicit(CG) at several iteration counts and Implicit(Neumann),
Unrolled(K), a plain double-backward CG written by hand (the floor for the same iteration count), Betty
0.2.1 (``cg`` and ``neumann``) and TorchOpt 0.7.3 (``custom_root`` with its default normal-equation CG and
with plain CG). Betty and TorchOpt rows appear only where they are importable (see benchmarks/README.md).

Run: ``python benchmarks/hypergrad_ridge.py`` (``--quick`` for a fast smoke run).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    load_average,
    machine_info,
    markdown_table,
    time_callable,
    time_interleaved,
    write_json,
)
from benchmarks.ridge_baselines import betty_hypergrad, handwritten_cg, torchopt_hypergrad  # noqa: E402

HyperFn = Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# The problem and its float64 oracle
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Ridge:
    """Data of one per-feature ridge problem, in one dtype, with the float64 oracle attached."""

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor
    w_star: torch.Tensor            # exact lower solution (float64 oracle, cast to the dtype)
    grad_true: torch.Tensor         # float64 closed-form hypergradient
    L: float                        # largest eigenvalue of H (float64)
    mu: float                       # smallest eigenvalue of H (float64)

    def to(self, dtype: torch.dtype) -> Ridge:
        c = lambda t: t.to(dtype)
        return Ridge(c(self.X), c(self.y), c(self.Xv), c(self.yv), c(self.lam), c(self.w_star), self.grad_true,
                     self.L, self.mu)

    @property
    def d(self) -> int:
        return self.X.shape[1]

    def g(self, lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        r = self.X @ w - self.y
        return 0.5 * (r @ r) + 0.5 * (lam * w * w).sum()

    def f(self, w: torch.Tensor) -> torch.Tensor:
        r = self.Xv @ w - self.yv
        return 0.5 * (r @ r)


def make_ridge(d: int, n: int, n_val: int, t_max: float = 1.5, lam_range: Tuple[float, float] = (1e-3, 1e-2),
               seed: int = 0) -> Ridge:
    r"""A float64 ridge problem and its oracle.

    Columns of X are N(0, 1/n) scaled by :math:`10^{-t_j}`, :math:`t_j` evenly spaced in [0, t_max], and
    :math:`\lambda_i \sim U(\text{lam\_range})`; the defaults give cond(H) ~ 3e2 at d = 100, n = 2000 (CG
    needs tens of iterations, a Neumann series with step 1/L thousands). For d > n the oracle solves with the Woodbury
    identity :math:`H^{-1} = \Lambda^{-1} - \Lambda^{-1}X^\top(I + X\Lambda^{-1}X^\top)^{-1}X\Lambda^{-1}`.
    """
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    scale = 10.0 ** (-torch.linspace(0.0, t_max, d, dtype=dt))
    X = torch.randn(n, d, generator=gen, dtype=dt) / math.sqrt(n) * scale
    Xv = torch.randn(n_val, d, generator=gen, dtype=dt) / math.sqrt(n_val) * scale
    w_gen = torch.randn(d, generator=gen, dtype=dt)
    y = X @ w_gen + 0.1 * torch.randn(n, generator=gen, dtype=dt)
    yv = Xv @ w_gen + 0.1 * torch.randn(n_val, generator=gen, dtype=dt)
    lam = lam_range[0] + (lam_range[1] - lam_range[0]) * torch.rand(d, generator=gen, dtype=dt)

    if d <= 2000:
        H = X.T @ X + torch.diag(lam)
        solve = lambda b: torch.linalg.solve(H, b)
        ev = torch.linalg.eigvalsh(H)
        L, mu = float(ev[-1]), float(ev[0])
    else:
        inv_lam = 1.0 / lam
        K = torch.eye(n, dtype=dt) + (X * inv_lam) @ X.T
        chol = torch.linalg.cholesky(K)

        def solve(b: torch.Tensor) -> torch.Tensor:
            t = inv_lam * b
            s = torch.cholesky_solve((X @ t).unsqueeze(1), chol).squeeze(1)
            return t - inv_lam * (X.T @ s)

        # Largest eigenvalue of H by power iteration on the operator (no d x d matrix).
        v = torch.randn(d, generator=gen, dtype=dt)
        for _ in range(200):
            v = X.T @ (X @ v) + lam * v
            v = v / v.norm()
        L = float(v @ (X.T @ (X @ v) + lam * v))
        mu = float(lam.min())  # a lower bound; X'X is singular when d > n
    w_star = solve(X.T @ y)
    u = solve(Xv.T @ (Xv @ w_star - yv))
    grad_true = -w_star * u
    return Ridge(X, y, Xv, yv, lam, w_star, grad_true, L, mu)


def rel_error(est: torch.Tensor, true: torch.Tensor) -> float:
    est = est.detach().to(torch.float64)
    return float((est - true).norm() / true.norm())


# ----------------------------------------------------------------------------------------------------------
# Methods: each builder returns a closure computing dF/dlam (setup excluded from the timing)
# ----------------------------------------------------------------------------------------------------------

def ours_implicit(p: Ridge, linear_solver: bl.LinearSolver) -> HyperFn:
    w_star = p.w_star
    lower = bl.LowerProblem(objective=p.g, solver=bl.ClosedForm(lambda lam: w_star))
    strategy = bl.Implicit(linear_solver=linear_solver)
    upper = lambda lam, w: p.f(w)

    def run() -> torch.Tensor:
        _, grad = bl.value_and_hypergrad(upper, lower, p.lam, w_star, strategy)
        return grad
    return run


def ours_unrolled(p: Ridge, steps: int) -> HyperFn:
    lower = bl.LowerProblem(objective=p.g, solver=bl.GradientDescent(step_size=1.0 / p.L, steps=steps))
    strategy = bl.Unrolled()
    init = torch.zeros_like(p.w_star)
    upper = lambda lam, w: p.f(w)

    def run() -> torch.Tensor:
        _, grad = bl.value_and_hypergrad(upper, lower, p.lam, init, strategy)
        return grad
    return run


def _importable(name: str) -> Optional[str]:
    try:
        mod = __import__(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"not importable: {type(exc).__name__}: {exc}"[:200]
    return None if mod else "not importable"


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------

def method_table(p: Ridge, size: str, quick: bool) -> List[Tuple[str, str, int, Callable[[], HyperFn]]]:
    """(family, label, iterations, builder) rows for one problem."""
    cg_iters = [10, 20] if quick else [10, 20, 50, 100]
    neu_iters = [50] if quick else ([100, 1000] if size == "small" else [100])
    unroll = [50] if quick else ([100, 1000] if size == "small" else [100])
    alpha = 1.0 / p.L
    rows: List[Tuple[str, str, int, Callable[[], HyperFn]]] = []
    for k in cg_iters:
        rows.append(("bilevel Implicit(CG)", f"CG({k})", k, lambda k=k: ours_implicit(p, bl.CG(maxiter=k))))
        rows.append(("hand-written CG", f"CG({k})", k, lambda k=k: handwritten_cg(p, k)))
    for k in neu_iters:
        rows.append(("bilevel Implicit(Neumann)", f"Neumann({k}, 1/L)", k,
                     lambda k=k: ours_implicit(p, bl.Neumann(steps=k, alpha=alpha))))
    for k in unroll:
        rows.append(("bilevel Unrolled", f"GD({k}, 1/L)", k, lambda k=k: ours_unrolled(p, k)))
    if _importable("betty") is None:
        for k in cg_iters:
            rows.append(("Betty 0.2.1 cg", f"cg_iterations={k}", k,
                         lambda k=k: betty_hypergrad(p, type="cg", cg_iterations=k, cg_alpha=1.0)))
        rows.append(("Betty 0.2.1 cg", "cg_iterations=20, cg_alpha=1/L", 20,
                     lambda: betty_hypergrad(p, type="cg", cg_iterations=20, cg_alpha=alpha)))
        for k in neu_iters:
            rows.append(("Betty 0.2.1 neumann", f"neumann_iterations={k}, alpha=1/L", k,
                         lambda k=k: betty_hypergrad(p, type="neumann", neumann_iterations=k, neumann_alpha=alpha)))
    if _importable("torchopt") is None:
        for k in cg_iters:
            rows.append(("TorchOpt 0.7.3 custom_root normal-CG (default)", f"maxiter={k}", k,
                         lambda k=k: torchopt_hypergrad(p, k, normal=True)))
            rows.append(("TorchOpt 0.7.3 custom_root CG", f"maxiter={k}", k,
                         lambda k=k: torchopt_hypergrad(p, k, normal=False)))
    return rows


def run_rows(p: Ridge, rows, repeats: int, warmup: int) -> List[Dict[str, Any]]:
    """Accuracy of each row, then all rows timed round-robin (see :func:`benchmarks.common.time_interleaved`)."""
    fns = [build() for _, _, _, build in rows]
    errors = [rel_error(fn(), p.grad_true) for fn in fns]
    timings = time_interleaved(fns, repeats=repeats, warmup=warmup)
    out = []
    for (family, label, iters, _), err, timing in zip(rows, errors, timings):
        out.append({"method": family, "config": label, "iterations": iters, "rel_error": err,
                    "median_ms": 1e3 * timing["median_s"], "q1_ms": 1e3 * timing["q1_s"], "q3_ms": 1e3 * timing["q3_s"],
                    "cpu_median_ms": 1e3 * timing["cpu_median_s"], "repeats": timing["repeats"]})
        print(f"  {family:48s} {label:34s} rel.err {err:.2e}  {out[-1]['median_ms']:9.3f} ms "
              f"(cpu {out[-1]['cpu_median_ms']:9.3f} ms)", flush=True)
    return out


def fastest_reaching(p: Ridge, target: float, repeats: int, warmup: int, quick: bool) -> List[Dict[str, Any]]:
    """Smallest iteration count (doubling search) at which each solver family reaches ``target`` rel. error."""
    alpha_1L = 1.0 / p.L
    alpha_opt = 2.0 / (p.L + p.mu)
    families: List[Tuple[str, str, Callable[[int], HyperFn]]] = [
        ("bilevel Implicit(CG)", "CG(k)", lambda k: ours_implicit(p, bl.CG(maxiter=k))),
        ("hand-written CG", "CG(k)", lambda k: handwritten_cg(p, k)),
        ("bilevel Implicit(Neumann)", "Neumann(k, 2/(L+mu))", lambda k: ours_implicit(p, bl.Neumann(steps=k, alpha=alpha_opt))),
    ]
    if _importable("betty") is None:
        families += [
            ("Betty 0.2.1 cg", "cg_iterations=k", lambda k: betty_hypergrad(p, type="cg", cg_iterations=k)),
            ("Betty 0.2.1 neumann", "alpha=1/L", lambda k: betty_hypergrad(
                p, type="neumann", neumann_iterations=k, neumann_alpha=alpha_1L)),
            ("Betty 0.2.1 neumann", "alpha=2/(L+mu)", lambda k: betty_hypergrad(
                p, type="neumann", neumann_iterations=k, neumann_alpha=alpha_opt)),
        ]
    if _importable("torchopt") is None:
        families += [
            ("TorchOpt 0.7.3 custom_root normal-CG (default)", "maxiter=k", lambda k: torchopt_hypergrad(p, k, True)),
            ("TorchOpt 0.7.3 custom_root CG", "maxiter=k", lambda k: torchopt_hypergrad(p, k, False)),
        ]
    k_max = 64 if quick else 16384
    out = []
    for family, label, build in families:
        k, found, best_err = 4, None, math.inf
        while k <= k_max:
            err = rel_error(build(k)(), p.grad_true)
            best_err = min(best_err, err)
            if err <= target:
                found = k
                break
            k *= 2
        row: Dict[str, Any] = {"method": family, "config": label, "target": target, "iterations": found,
                               "best_rel_error_seen": best_err, "max_iterations_tried": min(k, k_max)}
        if found is not None:
            # refine between found/2 and found by bisection, then time it
            lo, hi = found // 2, found
            while hi - lo > max(1, hi // 16):
                mid = (lo + hi) // 2
                if rel_error(build(mid)(), p.grad_true) <= target:
                    hi = mid
                else:
                    lo = mid
            fn = build(hi)
            row["iterations"] = hi
            row["rel_error"] = rel_error(fn(), p.grad_true)
            timing = time_callable(fn, repeats=repeats, warmup=warmup)
            row["median_ms"] = 1e3 * timing["median_s"]
            row["cpu_median_ms"] = 1e3 * timing["cpu_median_s"]
        else:
            row["rel_error"] = None
            row["median_ms"] = None
        print(f"  {family:48s} {label:22s} -> k={row['iterations']} err={row['rel_error']} "
              f"time={row['median_ms']} ms (best err seen {best_err:.2e})", flush=True)
        out.append(row)
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sizes", default="small,large", help="comma list of: small, large")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--no-search", action="store_true", help="skip the 'fastest config reaching 1e-5' search")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1; 0 keeps torch's default; see benchmarks/README.md)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "hypergrad_ridge_cpu.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*functorch.vjp.*")  # TorchOpt 0.7.3 on torch >= 2.0
    # size -> (d, n, n_val, t_max, lam_range)
    shapes = {"small": (100, 2000, 2000, 1.5, (1e-3, 1e-2)), "large": (10_000, 1000, 1000, 0.5, (0.05, 0.5))}
    if args.quick:
        shapes = {"small": (20, 200, 200, 1.0, (1e-2, 1e-1)), "large": (400, 100, 100, 0.5, (0.05, 0.5))}
    results: Dict[str, Any] = {
        "benchmark": "hypergrad_ridge",
        "machine": machine_info("cpu"),
        "protocol": f"median of {args.repeats} runs after {args.warmup} warm-up runs, same process; "
                    "relative error ||g_hat - g|| / ||g|| against the float64 closed form",
        "quick": args.quick,
        "load_average_start": load_average(),
        "versions": {"bilevel": bl.__version__, "betty": _version("betty"), "torchopt": _version("torchopt")},
        "problems": [],
    }
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        d, n, n_val, t_max, lam_range = shapes[size]
        base = make_ridge(d, n, n_val, t_max, lam_range)
        for dtype_name in [s.strip() for s in args.dtypes.split(",") if s.strip()]:
            p = base.to(getattr(torch, dtype_name))
            print(f"\n== ridge {size}: d={d} n={n} n_val={n_val} {dtype_name}; cond(H) ~ {base.L / base.mu:.3g} "
                  f"(L={base.L:.3g}, mu={base.mu:.3g})", flush=True)
            rows = run_rows(p, method_table(p, size, args.quick), args.repeats, args.warmup)
            entry: Dict[str, Any] = {"size": size, "d": d, "n": n, "n_val": n_val, "dtype": dtype_name,
                                     "L": base.L, "mu": base.mu, "rows": rows}
            if size == "small" and dtype_name == "float64" and not args.no_search:
                print("  -- fastest configuration reaching rel. error <= 1e-5:")
                entry["fastest_to_1e-5"] = fastest_reaching(p, 1e-5, args.repeats, args.warmup, args.quick)
            entry["ratio_ours_vs_handwritten"] = _ratios(rows)
            results["problems"].append(entry)
            print()
            print(markdown_table(["method", "config", "rel. error", "median ms", "CPU ms"],
                                 [[r["method"], r["config"], r["rel_error"], r["median_ms"], r["cpu_median_ms"]]
                                  for r in rows]))
    results["load_average_end"] = load_average()
    path = write_json(args.out, results)
    print(f"\nwrote {path}")
    return results


def _ratios(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Time of bilevel Implicit(CG(k)) over the hand-written CG(k), per k, wall and CPU (target: <= 1.1)."""
    out: Dict[str, Dict[str, float]] = {}
    for key in ("median_ms", "cpu_median_ms"):
        ours = {r["iterations"]: r[key] for r in rows if r["method"] == "bilevel Implicit(CG)"}
        hand = {r["iterations"]: r[key] for r in rows if r["method"] == "hand-written CG"}
        out[key] = {str(k): ours[k] / hand[k] for k in sorted(ours) if k in hand}
    return out


def _version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version({"betty": "betty-ml"}.get(name, name))
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
