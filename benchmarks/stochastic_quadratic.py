r"""Stochastic bi-level methods on benchopt's simulated quadratic: ||grad h||^2 and h against wall time.

The problem (as benchopt's ``benchmark_bilevel`` defines it; our own generator): inner variable
:math:`z \in \mathbb R^{p}`, outer :math:`x \in \mathbb R^{d}`,

.. math::

    g(z, x) &= \tfrac1{n}\textstyle\sum_i \tfrac12 z^\top A_i z + \tfrac12 x^\top B_i x + x^\top C_i z
               + a_i^\top z + b_i^\top x,\\
    f(z, x) &= \tfrac1{m}\textstyle\sum_j \tfrac12 z^\top F_j z + \tfrac12 x^\top H_j x + x^\top K_j z
               + f_j^\top z + h_j^\top x,

with :math:`n = 32768`, :math:`m = 1024`, :math:`p = 100`, :math:`d = 10`; :math:`A_i = r_i r_i^\top` rank one with
:math:`\tfrac1n\sum_i A_i = \bar A` exactly (eigenvalues log-spaced in :math:`[0.1, 1]`), :math:`\bar C` with all
singular values 0.1 plus rank-one noise :math:`C_i = \bar C + p_i q_i^\top - \tfrac1n\sum_k p_k q_k^\top`,
:math:`B_i, H_j` rank one with means that have one zero eigenvalue, :math:`F_j` rank one around
:math:`\bar F` (eigenvalues in :math:`[0.1, 1]`), :math:`K_j` like :math:`C_i`, vectors standard normal; float32;
:math:`z_0 = 0`, :math:`x_0 = -2\cdot\mathbf 1`; mini-batches of 64 drawn with replacement.
Full-batch quantities use the mean matrices, and the metric is the exact
:math:`\|\nabla h(x)\|^2`, :math:`h(x) = f(z^\star(x), x)`, computed in float64 outside the timed region.

Methods: ``bilevel``'s SOBA, F2SA, BOME (single loop, ``method.step`` + torch.optim SGD on x), AmIGO and
StocBiO (strategies for ``bilevel.solve`` over ``TorchOptim`` SGD), and the deterministic ``Implicit(CG)``
(lower problem solved from scratch by full-batch gradient descent at each outer step) and ``Unrolled``.
Each runs for a wall-time budget. Separately, the per-iteration cost of each single-loop method is
measured against a hand-written PyTorch loop of the same algorithm (same objectives, same autograd
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
from types import SimpleNamespace
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

# benchopt's JAX timings on a 2-core machine like ours, idle (the numbers): seconds to reach ||grad h||^2 <= target
BENCHOPT_JAX = {"AmIGO": {"1e-2": 1.7, "1e-3": 3.5}, "SOBA": {"1e-2": 3.8, "3e-3": 6.9}}
TARGETS = (1e-2, 3e-3, 1e-3)
PLOT_TITLE = "benchopt's quadratic (CPU, float32, batch 64)"


# ----------------------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------------------
def _orthogonal(gen: torch.Generator, k: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0]


def _spectrum_matrix(gen: torch.Generator, eig: torch.Tensor) -> torch.Tensor:
    Q = _orthogonal(gen, eig.numel())
    return Q @ torch.diag(eig) @ Q.T


def _rows_with_second_moment(gen: torch.Generator, n: int, M: torch.Tensor) -> torch.Tensor:
    """n rows r_i with (1/n) sum r_i r_i' = M exactly (M symmetric PSD): whitened Gaussians times M^{1/2}."""
    X = torch.randn(n, M.shape[0], generator=gen, dtype=torch.float64)
    L = torch.linalg.cholesky(X.T @ X / n)
    X = torch.linalg.solve_triangular(L, X.T, upper=False).T
    w, V = torch.linalg.eigh(M)
    return X @ (V * w.clamp_min(0).sqrt()) @ V.T


def _cross(gen: torch.Generator, n: int, d: int, p: int, sv: float, noise: float):
    """Mean cross matrix (d, p) with all singular values ``sv``, and rank-one noise rows P (n, d), Q (n, p)."""
    C = sv * _orthogonal(gen, d) @ _orthogonal(gen, p)[:d]
    P = torch.randn(n, d, generator=gen, dtype=torch.float64) / d**0.5
    Q = noise * torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5
    return C, P, Q, P.T @ Q / n


def make_problem(n_inner: int = 32768, n_outer: int = 1024, p: int = 100, d: int = 10, mu: float = 0.1,
                 L: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    logspace = torch.logspace(math.log10(mu), math.log10(L), p, dtype=torch.float64)
    one_zero = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.logspace(math.log10(mu), math.log10(L), d - 1, dtype=torch.float64)])
    A, F = _spectrum_matrix(gen, logspace), _spectrum_matrix(gen, logspace)
    B, H = _spectrum_matrix(gen, one_zero), _spectrum_matrix(gen, one_zero)
    R, S = _rows_with_second_moment(gen, n_inner, A), _rows_with_second_moment(gen, n_inner, B)
    RF, SH = _rows_with_second_moment(gen, n_outer, F), _rows_with_second_moment(gen, n_outer, H)
    C, Pc, Qc, Mc = _cross(gen, n_inner, d, p, 0.1, 0.1)
    K, Pk, Qk, Mk = _cross(gen, n_outer, d, p, 0.1, 0.1)
    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    a, b, fv, hv = normal(n_inner, p), normal(n_inner, d), normal(n_outer, p), normal(n_outer, d)
    exact = SimpleNamespace(A=A, B=B, C=C, a=a.mean(0), b=b.mean(0), F=F, H=H, K=K, f=fv.mean(0), h=hv.mean(0))
    cast = {k: v.to(dtype) for k, v in dict(R=R, S=S, RF=RF, SH=SH, CM=C - Mc, Pc=Pc, Qc=Qc, KM=K - Mk, Pk=Pk, Qk=Qk,
                                             a=a, b=b, fv=fv, hv=hv, A=A, B=B, C=C, F=F, H=H, K=K).items()}
    t = SimpleNamespace(**cast)
    t.abar, t.bbar, t.fbar, t.hbar = (v.mean(0).to(dtype) for v in (a, b, fv, hv))

    def g(x, z, idx):
        r, s = t.R[idx], t.S[idx]
        return (0.5 * (r @ z).square().mean() + 0.5 * (s @ x).square().mean() + x @ t.CM @ z
                + ((t.Pc[idx] @ x) * (t.Qc[idx] @ z)).mean() + t.a[idx].mean(0) @ z + t.b[idx].mean(0) @ x)

    def f(x, z, idx):
        r, s = t.RF[idx], t.SH[idx]
        return (0.5 * (r @ z).square().mean() + 0.5 * (s @ x).square().mean() + x @ t.KM @ z
                + ((t.Pk[idx] @ x) * (t.Qk[idx] @ z)).mean() + t.fv[idx].mean(0) @ z + t.hv[idx].mean(0) @ x)

    def g_full(x, z):  # the mean matrices: the full-batch lower objective
        return 0.5 * z @ t.A @ z + 0.5 * x @ t.B @ x + x @ t.C @ z + t.abar @ z + t.bbar @ x

    def f_full(x, z):
        return 0.5 * z @ t.F @ z + 0.5 * x @ t.H @ x + x @ t.K @ z + t.fbar @ z + t.hbar @ x

    J = -torch.linalg.solve(A, C.T)  # dz*/dx, (p, d)
    reduced = H + K @ J + J.T @ K.T + J.T @ F @ J
    return SimpleNamespace(g=g, f=f, g_full=g_full, f_full=f_full, exact=exact, J=J, reduced_hessian=reduced,
                           n_inner=n_inner, n_outer=n_outer, p=p, d=d, dtype=dtype, t=t)


def z_star(P: SimpleNamespace, x: torch.Tensor) -> torch.Tensor:
    e = P.exact
    return -torch.linalg.solve(e.A, e.C.T @ x.double() + e.a)


def metrics(P: SimpleNamespace, x: torch.Tensor) -> Dict[str, float]:
    """Exact ||grad h(x)||^2 and h(x) = f(z*(x), x) in float64 from the mean matrices."""
    e, x = P.exact, x.detach().double()
    z = z_star(P, x)
    grad = e.H @ x + e.K @ z + e.h + P.J.T @ (e.F @ z + e.K.T @ x + e.f)
    h = 0.5 * z @ e.F @ z + 0.5 * x @ e.H @ x + x @ e.K @ z + e.f @ z + e.h @ x
    return {"grad_norm2": float(grad @ grad), "h": float(h)}


# ----------------------------------------------------------------------------------------------------------
# The methods: each builder returns (x, one_iteration) for the budget loop
# ----------------------------------------------------------------------------------------------------------
# Step sizes: tuned by hand once on this problem (a short grid, float32), then fixed.
# (SOBA: rho, gamma in {0.05, 0.1, 0.3, 0.5}; AmIGO / StocBiO: x step in {1.0, 0.3, 0.1, 0.05}, inner and system
# steps 0.3 or 0.1; F2SA: lam0 in {10, 100}; BOME: xi in {0.03, 0.1, 0.3}; Implicit(CG): 100 lower steps and CG(20)
# or 50 and CG(10).)
STEPS = {
    "SOBA": {"rho": 0.1, "gamma": 0.05},
    "AmIGO": {"inner_lr": 0.3, "inner_steps": 10, "v_lr": 0.3, "v_steps": 10, "gamma": 0.1},
    "StocBiO": {"inner_lr": 0.3, "inner_steps": 10, "v_lr": 0.3, "v_steps": 10, "gamma": 0.1},
    "F2SA": {"rho": 0.1, "gamma": 0.1, "lam": 100.0, "lam_growth": 0.01},
    "BOME": {"alpha": 0.5, "xi": 0.03, "inner_steps": 10, "eta": 0.5},
    "Implicit(CG)": {"lower_step": 1.0, "lower_steps": 50, "cg": 10, "gamma": 1.0},
    "Unrolled": {"lower_step": 1.0, "lower_steps": 30, "gamma": 1.0},
}


def _x0(P) -> torch.Tensor:
    return torch.full((P.d,), -2.0, dtype=P.dtype, requires_grad=True)


def _z0(P) -> torch.Tensor:
    return torch.zeros(P.p, dtype=P.dtype)


def _samplers(P, batch: int, seed: int):
    return bl.RandomBatches(P.n_inner, batch, seed=seed), bl.RandomBatches(P.n_outer, batch, seed=seed + 1)


def single_loop(name: str, torch_optim: bool = True):
    """``method.step`` then torch.optim SGD on x (as users run it), or a plain in-place update of x."""

    def build(P, batch: int, seed: int):
        s = STEPS[name]
        inner, outer = _samplers(P, batch, seed)
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
        x = _x0(P)
        opt = torch.optim.SGD([x], lr=lr)
        state = method.init(_z0(P))

        def iteration() -> None:
            x.grad = method.step(x, state)
            opt.step()

        def iteration_inplace() -> None:
            with torch.no_grad():
                x.sub_(lr * method.step(x, state))

        return x, (iteration if torch_optim else iteration_inplace)

    return build


def solve_then_hypergrad(name: str):
    def build(P, batch: int, seed: int):
        s = STEPS[name]
        inner, outer = _samplers(P, batch, seed)
        lower = bl.LowerProblem(P.g, solver=bl.TorchOptim(torch.optim.SGD, s["inner_steps"], batches=inner, lr=s["inner_lr"]))
        cls = bl.AmIGO if name == "AmIGO" else bl.StocBiO
        strategy = cls(inner, steps=s["v_steps"], step_size=s["v_lr"])
        x = _x0(P)
        opt = torch.optim.SGD([x], lr=s["gamma"])
        z = [_z0(P)]

        def iteration() -> None:
            y = bl.solve(lower, x, z[0], strategy, check_finite=False)
            P.f(x, y, outer()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            z[0] = y.detach()

        return x, iteration

    return build


def deterministic(name: str):
    def build(P, batch: int, seed: int):
        s = STEPS[name]
        lower = bl.LowerProblem(P.g_full, solver=bl.GradientDescent(s["lower_step"], s["lower_steps"]))
        strategy = bl.Implicit(bl.CG(maxiter=s["cg"])) if name == "Implicit(CG)" else bl.Unrolled()
        x = _x0(P)
        opt = torch.optim.SGD([x], lr=s["gamma"])
        z0 = _z0(P)

        def iteration() -> None:  # from scratch: z0 = 0 at every outer step
            P.f_full(x, bl.solve(lower, x, z0, strategy, check_finite=False)).backward()
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
def _grad(value, wrt, **kw):
    return torch.autograd.grad(value, wrt, **kw)


def hand_soba(P, batch: int, seed: int):
    s, (inner, outer) = STEPS["SOBA"], _samplers(P, batch, seed)
    it = {"x": _x0(P).detach(), "z": _z0(P), "v": _z0(P)}

    def iteration() -> None:
        x, z, v = it["x"].requires_grad_(), it["z"].requires_grad_(), it["v"]
        i, j = inner(), outer()
        with torch.enable_grad():
            (gz,) = _grad(P.g(x, z, i), z, create_graph=True)
            cross, hv = _grad(gz, (x, z), grad_outputs=v)
            fx, fz = _grad(P.f(x, z, j), (x, z))
        it["z"] = z.detach() - s["rho"] * gz.detach()
        it["v"] = v - s["rho"] * (hv + fz)
        it["x"] = x.detach() - s["gamma"] * (cross + fx)

    return iteration


def hand_f2sa(P, batch: int, seed: int):
    s, (inner, outer) = STEPS["F2SA"], _samplers(P, batch, seed)
    it = {"x": _x0(P).detach(), "z": _z0(P), "y": _z0(P), "lam": s["lam"], "t": 0}

    def iteration() -> None:
        x, y, z, lam = it["x"].requires_grad_(), it["y"].requires_grad_(), it["z"].requires_grad_(), it["lam"]
        i, j = inner(), outer()
        gxz, gz = _grad(P.g(x, z, i), (x, z))
        gxy, gy = _grad(P.g(x, y, i), (x, y))
        fx, fy = _grad(P.f(x, y, j), (x, y))
        it["z"] = z.detach() - s["rho"] * gz
        it["y"] = y.detach() - (s["rho"] / lam) * fy - s["rho"] * gy
        it["x"] = x.detach() - s["gamma"] * (fx + lam * (gxy - gxz))
        it["lam"] = lam + s["lam_growth"] / (it["t"] + 1) ** (1 / 7)
        it["t"] += 1

    return iteration


def hand_bome(P, batch: int, seed: int):
    s, (inner, outer) = STEPS["BOME"], _samplers(P, batch, seed)
    it = {"x": _x0(P).detach(), "y": _z0(P)}

    def iteration() -> None:
        x, y = it["x"].requires_grad_(), it["y"].requires_grad_()
        i, j = inner(), outer()
        xc, theta = x.detach(), y.detach()
        for _ in range(s["inner_steps"]):
            theta = theta.requires_grad_()
            (d,) = _grad(P.g(xc, theta, i), theta)
            theta = theta.detach() - s["alpha"] * d
        (gxt,) = _grad(P.g(x, theta, i), x)
        gx, gy = _grad(P.g(x, y, i), (x, y))
        fx, fy = _grad(P.f(x, y, j), (x, y))
        qx = gx - gxt
        nq = qx @ qx + gy @ gy
        lam = torch.clamp_min((s["eta"] * nq - fx @ qx - fy @ gy) / nq.clamp_min(torch.finfo(nq.dtype).tiny), 0.0)
        it["y"] = y.detach() - s["xi"] * (fy + lam * gy)
        it["x"] = x.detach() - s["xi"] * (fx + lam * qx)

    return iteration


def analytic_soba(P, batch: int, seed: int, compile: bool = False):
    """The SOBA iteration with the quadratic's derivatives as matrix products (no autograd): the eager floor, and
    with ``compile`` the same function under ``torch.compile``."""
    s, (inner, outer), t = STEPS["SOBA"], _samplers(P, batch, seed), P.t
    it = {"x": _x0(P).detach(), "z": _z0(P), "v": _z0(P)}
    inv = 1.0 / batch

    def update(x, z, v, i, j):
        r, pc, qc = t.R[i], t.Pc[i], t.Qc[i]
        gz = inv * (r.T @ (r @ z) + qc.T @ (pc @ x)) + t.CM.T @ x + t.a[i].mean(0)
        hv = inv * (r.T @ (r @ v))
        cross = t.CM @ v + inv * (pc.T @ (qc @ v))
        rf, sh, pk, qk = t.RF[j], t.SH[j], t.Pk[j], t.Qk[j]
        fz = inv * (rf.T @ (rf @ z) + qk.T @ (pk @ x)) + t.KM.T @ x + t.fv[j].mean(0)
        fx = inv * (sh.T @ (sh @ x) + pk.T @ (qk @ z)) + t.KM @ z + t.hv[j].mean(0)
        return x - s["gamma"] * (cross + fx), z - s["rho"] * gz, v - s["rho"] * (hv + fz)

    fn = torch.compile(update) if compile else update

    def iteration() -> None:
        it["x"], it["z"], it["v"] = fn(it["x"], it["z"], it["v"], inner(), outer())

    return iteration


def compiled_steps(P, batch: int, seed: int, iters: int, repeats: int) -> Dict[str, Any]:
    """What torch.compile buys: the analytic SOBA step, and bilevel's F2SA step (first order), eager vs compiled.

    bilevel's SOBA step does not compile: its Hessian-vector product is a double backward, which torch.compile's
    AOT autograd does not support (the error is recorded)."""
    out: Dict[str, Any] = {}
    t0 = time.perf_counter()
    contenders = {"analytic SOBA, eager": analytic_soba(P, batch, seed),
                  "analytic SOBA, torch.compile": analytic_soba(P, batch, seed, compile=True)}
    f2sa_inner, f2sa_outer = _samplers(P, batch, seed)
    s = STEPS["F2SA"]
    x = {"eager": _x0(P).detach(), "compiled": _x0(P).detach()}
    for mode in ("eager", "compiled"):
        method = bl.F2SA(bl.LowerProblem(P.g), P.f, step_size=s["rho"], lam=s["lam"], lower_batches=f2sa_inner,
                         upper_batches=f2sa_outer)
        state = method.init(_z0(P))
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
        torch.compile(soba.step)(_x0(P).detach(), soba.init(_z0(P)))
        out["bilevel_soba_step_compiles"] = True
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden
        out["bilevel_soba_step_compiles"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for k, v in out["ms_per_iteration"].items():
        print(f"  {k:34s} {v['median_ms']:.3f} ms (CPU {v['cpu_median_ms']:.3f}, min {v['min_ms']:.3f})", flush=True)
    print(f"  bilevel SOBA step under torch.compile: {out['bilevel_soba_step_compiles']}", flush=True)
    return out


HAND = {"SOBA": hand_soba, "F2SA": hand_f2sa, "BOME": hand_bome}


def per_iteration_cost(P, batch: int, seed: int, iters: int, repeats: int, warmup: int) -> List[Dict[str, Any]]:
    """Median seconds per iteration of bilevel's step (+ torch.optim SGD on x) vs the hand-written loop, interleaved."""
    rows = []
    for name in ("SOBA", "F2SA", "BOME"):
        n = max(iters // (5 if name == "BOME" else 1), 1)
        contenders = {"bilevel": METHODS[name](P, batch, seed)[1],
                      "bilevel, in-place x update": single_loop(name, torch_optim=False)(P, batch, seed)[1],
                      "hand-written": HAND[name](P, batch, seed)}
        if name == "SOBA":
            contenders["analytic (no autograd)"] = analytic_soba(P, batch, seed)
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
    x0 = torch.full((P.d,), -2.0)
    info = {"n_inner": P.n_inner, "n_outer": P.n_outer, "p": P.p, "d": P.d, "batch": batch, "dtype": "float32",
            "reduced_hessian_eigs": [float(eig.min()), float(eig.max())], "reduced_hessian_cond": float(eig.max() / eig.min()),
            "grad_norm2_at_x0": metrics(P, x0)["grad_norm2"], "h_at_x0": metrics(P, x0)["h"]}
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
