r"""Side by side with benchopt's ``benchmark_bilevel`` on *its* simulated quadratic: SOBA, AmIGO, StocBiO.

benchopt's instance comes from benchopt's generator (``datasets/simulated.py``, ``benchmark_utils/gen_matrices.py``,
its keys: dataset ``random_state=2442``; ``config/quadratics_021424.yml``'s sizes: 32,768 inner and 1,024 outer samples,
:math:`z \in \mathbb R^{100}`, :math:`x \in \mathbb R^{10}`, ``mu_inner=0.1``, cross singular values 0.1; :math:`x_0 =
-2\cdot\mathbf 1`): dense per-sample matrices ``(n, 100, 100)``, an oracle averaging a contiguous block of 64 of them.
A worker run by a JAX interpreter (``--jax-python``) imports benchopt's code from ``--benchopt-dir`` (a checkout of
benchopt/benchmark_bilevel, not part of this repository), writes the instance and the block starts its samplers draw
(block order reshuffled each epoch; solver ``random_state``) to an ``.npz``, and runs benchopt's JAX solvers with
their default hyperparameters (``BENCHOPT``), timing each jitted epoch of ``--eval-every`` iterations. This side runs
``bilevel``'s SOBA, AmIGO and StocBiO on the same arrays with a dense oracle written like benchopt's, the same blocks
and steps (SOBA: :math:`0.1/\sqrt{t+1}` on y, v, x; AmIGO, StocBiO: constant 0.1; ``n_shia_steps`` products =
``StocBiO(steps=n_shia_steps + 1)`` terms). float32 on both sides; the metric is the exact :math:`\|\nabla h(x)\|^2`
in float64 from the mean matrices, at the same checkpoints, outside the timed region.

Factors (time = iterations x ms/iteration), one change at a time: framework = JAX / torch time (b, benchopt's steps),
steps = (b) / (c) our tuned constant steps (``quadratic_problem.STEPS``) on benchopt's instance, instance = iterations
(c) / (d) the same steps on ``stochastic_quadratic``'s condition-18 instance, oracle = ms/iteration dense (c) / its
rank-one oracle (d); (e) is benchopt's steps on that instance.

Run pinned to one core (the worker inherits it): ``taskset -c 1 python benchmarks/benchopt_quadratic.py
--benchopt-dir /path/to/benchmark_bilevel --jax-python /path/to/jaxenv/bin/python``. Without ``--jax-python`` an
``--instance`` written earlier is reused, else one is drawn from benchopt's recipe by our own generator (not benchopt's
numbers; the JSON says so). ``--tiny``: a smoke test (no JAX needed). Writes ``benchmarks/results/benchopt_quadratic_cpu.*``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import numpy as np

TARGETS = (1e-1, 1e-2, 3e-3, 1e-3)
METHODS = ("SOBA", "AmIGO", "StocBiO")
# benchopt's solver defaults (solvers/soba.py, amigo.py, stocbio.py `parameters`); SOBA's steps decrease as
# step_size / sqrt(t + 1) (exponents 0.5 in its code), AmIGO's and StocBiO's are constant (exponents 0)
BENCHOPT = {
    "SOBA": {"step_size": 0.1, "outer_ratio": 1.0, "batch_size": 64},
    "AmIGO": {"step_size": 0.1, "outer_ratio": 1.0, "n_inner_steps": 10, "batch_size": 64},
    "StocBiO": {"step_size": 0.1, "outer_ratio": 1.0, "n_inner_steps": 10, "n_shia_steps": 10, "batch_size": 64},
}
DATASET = {"L_cross_inner": 0.1, "L_cross_outer": 0.1, "mu_inner": 0.1, "n_samples_inner": 32768,
           "n_samples_outer": 1024, "dim_inner": 100, "dim_outer": 10}
TINY_DATASET = {**DATASET, "n_samples_inner": 1024, "n_samples_outer": 256, "dim_inner": 20, "dim_outer": 5}
ITERATIONS = {"SOBA": 20480, "AmIGO": 1024, "StocBiO": 1024}
INNER_DRAWS = {"SOBA": 1, "AmIGO": 21, "StocBiO": 21}  # inner-sampler draws per iteration (outer: 1)
ARRAYS = ("hess_inner_inner", "hess_inner_outer", "cross_inner", "linear_inner_inner", "linear_inner_outer",
          "hess_outer_inner", "hess_outer_outer", "cross_outer", "linear_outer_inner", "linear_outer_outer")


def jax_worker(spec: Dict[str, Any]) -> None:
    import importlib.util

    sys.path.insert(0, spec["benchopt_dir"])
    os.chdir(spec["cache_dir"])  # gen_matrices caches with joblib in ./__cache__
    import jax
    from benchmark_utils.gen_matrices import gen_matrices
    from benchmark_utils.minibatch_sampler import init_sampler
    from datasets.simulated import Dataset
    from objective import Objective

    ds = Dataset.get_instance(**spec["dataset"])
    data = ds.get_data()
    keys = jax.random.split(jax.random.PRNGKey(ds.random_state), 2)  # as Dataset.get_data (its first trial)
    d = spec["dataset"]
    arrays = [*gen_matrices(d["n_samples_inner"], d["dim_inner"], d["dim_outer"], ds.L_inner_inner, ds.L_outer_inner,
                            d["L_cross_inner"], d["mu_inner"], keys[0]),
              *gen_matrices(d["n_samples_outer"], d["dim_inner"], d["dim_outer"], ds.L_inner_outer, ds.L_outer_outer,
                            d["L_cross_outer"], d["mu_inner"], keys[1])]
    out = {name: np.asarray(a) for name, a in zip(ARRAYS, arrays)}
    rng = np.random.default_rng(0)  # check the exported arrays against benchopt's own jitted oracle
    z, x = rng.standard_normal(d["dim_inner"]).astype(np.float32), rng.standard_normal(d["dim_outer"]).astype(np.float32)
    s = slice(64, 128)
    mine = np.mean(0.5 * (out["hess_inner_inner"][s] @ z) @ z + 0.5 * (out["hess_inner_outer"][s] @ x) @ x
                   + (out["cross_inner"][s] @ z) @ x + out["linear_inner_inner"][s] @ z + out["linear_inner_outer"][s] @ x)
    theirs = float(data["pb_inner"][0](z, x, 64, batch_size=64))
    obj = Objective.get_instance()
    obj.set_data(**data)
    for rs in spec["random_states"]:  # the batch starts benchopt's samplers draw (StochasticJaxSolver.set_objective)
        skeys = jax.random.split(jax.random.PRNGKey(rs), 2)
        for side, n, k in (("inner", d["n_samples_inner"], skeys[0]), ("outer", d["n_samples_outer"], skeys[1])):
            sampler, state = init_sampler(n_samples=n, batch_size=64, key=k)
            draws = spec["draws"][side]
            def draw(st, _, f=sampler):
                start, *_, st = f(st)  # (f updates the dict it is given: call it once)
                return st, start

            _, starts = jax.lax.scan(draw, state, None, length=draws)
            out[f"starts_{side}_{rs}"] = np.asarray(starts, dtype=np.int64)
    np.savez(spec["instance"], **out)
    res = {"jax_version": jax.__version__, "devices": [str(v) for v in jax.devices()], "x64": bool(jax.config.jax_enable_x64),
           "xla_flags": os.environ.get("XLA_FLAGS"), "affinity": sorted(os.sched_getaffinity(0)),
           "oracle_check": {"exported_arrays": float(mine), "benchopt_f_inner": theirs}, "runs": []}
    for name in spec["methods"]:
        mod_spec = importlib.util.spec_from_file_location(f"bo_{name}", f"{spec['benchopt_dir']}/solvers/{name.lower()}.py")
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        for rs in spec["random_states"]:
            solver = mod.Solver.get_instance(**BENCHOPT[name], eval_freq=spec["eval_every"], random_state=rs)
            solver.set_objective(**obj.get_objective())  # jits one epoch and warms it up (run_once(2))
            carry = solver.init()
            xs, values, wall, cpu = [np.asarray(carry["outer_var"]).tolist()], [], [], []
            for _ in range(spec["iterations"][name] // spec["eval_every"]):
                t0, c0 = time.perf_counter(), time.process_time()
                carry = solver.one_epoch(carry, spec["eval_every"])
                jax.block_until_ready(carry["outer_var"])
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                xs.append(np.asarray(carry["outer_var"]).tolist())
                values.append(float(data["metrics"](carry["inner_var"], carry["outer_var"])["value"]))
            res["runs"].append({"method": name, "random_state": rs, "x": xs, "benchopt_metric": values,
                                "chunk_wall_s": wall, "chunk_cpu_s": cpu})
            print(f"  JAX {name} rs={rs}: {1e3 * sum(wall) / (len(wall) * spec['eval_every']):.3f} ms/it", flush=True)
    Path(spec["result"]).write_text(json.dumps(res))


def recipe_instance(d: Dict[str, Any], seed: int = 0) -> Dict[str, np.ndarray]:
    """benchopt's recipe with our own random numbers (used when no JAX run gives its instance): per-sample rank-one
    x_i x_i' with x_i ~ N(0, S^2), S^2 with spectrum [mu, L]; cross U D x_i x_i' V' with D = diag(L_cross)."""
    rng = np.random.default_rng(seed)
    p, q = d["dim_inner"], d["dim_outer"]

    def block(n, l_cross):
        def rank_one(k, eig):
            u = np.linalg.qr(rng.standard_normal((k, k)))[0]
            x = rng.standard_normal((n, k)) @ (u * np.sqrt(eig)) @ u.T
            return np.einsum("ni,nj->nij", x, x)
        hz = rank_one(p, np.logspace(np.log10(d["mu_inner"]), 0, p))
        hx = rank_one(q, np.r_[0.0, np.logspace(np.log10(d["mu_inner"]), 0, q - 1)])
        u, v = np.linalg.qr(rng.standard_normal((q, q)))[0], np.linalg.qr(rng.standard_normal((p, p)))[0]
        w = rng.standard_normal((n, p))
        cross = np.einsum("ni,nj->nij", w[:, :q] * l_cross @ u.T, w @ v.T)
        return [a.astype(np.float32) for a in (hz, hx, cross, rng.standard_normal((n, p)), rng.standard_normal((n, q)))]

    return dict(zip(ARRAYS, block(d["n_samples_inner"], d["L_cross_inner"]) + block(d["n_samples_outer"], d["L_cross_outer"])))


def contiguous_starts(n: int, draws: int, seed: int, batch: int = 64) -> np.ndarray:
    """Our sampler of benchopt's scheme: contiguous blocks of ``batch``, the block order reshuffled each epoch."""
    rng, blocks, out = np.random.default_rng(seed), np.arange(n // batch), []
    while len(out) < draws:
        out.extend((batch * rng.permutation(blocks)).tolist())
    return np.asarray(out[:draws])


class Starts:
    """A batch source replaying a sequence of block starts as ``slice(start, start + 64)`` (a view: no copy)."""

    def __init__(self, starts: np.ndarray, batch: int = 64) -> None:
        self.slices = iter([slice(int(s), int(s) + batch) for s in starts])

    def __call__(self) -> slice:
        return next(self.slices)


def dense_problem(arrays: Dict[str, np.ndarray]) -> SimpleNamespace:
    """benchopt's oracle in torch: the mean over the batch of 0.5 z'A_i z + 0.5 x'B_i x + x'C_i z + a_i'z + b_i'x with
    the dense per-sample matrices; and the float64 mean matrices for the exact metric."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in arrays.items() if not k.startswith("starts")}

    def quad(hz, hx, c, lz, lx):
        def fn(x, z, s):
            return (0.5 * ((hz[s] @ z) @ z) + 0.5 * ((hx[s] @ x) @ x) + (c[s] @ z) @ x + lz[s] @ z + lx[s] @ x).mean()
        return fn

    def mean64(a):  # chunked: the float64 copy of a (32768, 100, 100) array would take 2.6 GB
        return sum(a[i:i + 4096].double().sum(0) for i in range(0, a.shape[0], 4096)) / a.shape[0]

    g = quad(t["hess_inner_inner"], t["hess_inner_outer"], t["cross_inner"], t["linear_inner_inner"], t["linear_inner_outer"])
    f = quad(t["hess_outer_inner"], t["hess_outer_outer"], t["cross_outer"], t["linear_outer_inner"], t["linear_outer_outer"])
    A, C, F, H, K = (mean64(t[k]) for k in ("hess_inner_inner", "cross_inner", "hess_outer_inner", "hess_outer_outer",
                                             "cross_outer"))
    exact = SimpleNamespace(A=A, C=C, a=mean64(t["linear_inner_inner"]), F=F, H=H, K=K, f=mean64(t["linear_outer_inner"]),
                            h=mean64(t["linear_outer_outer"]))
    J = -torch.linalg.solve(A, C.T)
    return SimpleNamespace(g=g, f=f, exact=exact, J=J, reduced_hessian=H + K @ J + J.T @ K.T + J.T @ F @ J,
                           n_inner=t["hess_inner_inner"].shape[0], n_outer=t["hess_outer_inner"].shape[0],
                           p=A.shape[0], d=H.shape[0], dtype=torch.float32)


def steps_config(name: str, which: str) -> Dict[str, Any]:
    """benchopt's steps (``which='benchopt'``) or our tuned constant ones (``quadratic_problem.STEPS``), as
    rho (y, v), v_steps / v_lr (system), inner_steps / inner_lr, gamma (x) and decay (exponent on t + 1)."""
    from benchmarks.quadratic_problem import STEPS

    if which == "benchopt":
        b, lr = BENCHOPT[name], BENCHOPT[name]["step_size"]
        return {"rho": lr, "gamma": lr / b["outer_ratio"], "decay": 0.5 if name == "SOBA" else 0.0, "inner_lr": lr,
                "v_lr": lr, "inner_steps": b.get("n_inner_steps"), "v_steps": b.get("n_inner_steps"),
                "terms": b.get("n_shia_steps", 0) + 1}  # n_shia_steps Hessian-vector products = that + 1 Neumann terms
    s = STEPS[name]
    return {**s, "decay": 0.0, "terms": s.get("v_steps")}


def build(name: str, P: SimpleNamespace, s: Dict[str, Any], inner, outer):
    """(x, one_iteration) for ``bilevel``'s method with steps ``s``: torch.optim SGD on x (with a LambdaLR for a
    decreasing step), warm-started lower iterates, batches from ``inner`` and ``outer``."""
    import torch

    import bilevel as bl
    from benchmarks.outer_loops import single_loop_iteration, solve_iteration

    decay = s["decay"]
    x = torch.full((P.d,), -2.0, dtype=torch.float32, requires_grad=True)
    z0 = torch.zeros(P.p, dtype=torch.float32)
    opt = torch.optim.SGD([x], lr=s["gamma"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) ** -decay) if decay else None
    if name == "SOBA":
        rho = s["rho"]
        method = bl.SOBA(bl.LowerProblem(P.g), P.f, step_size=(lambda t: rho * (t + 1) ** -decay) if decay else rho,
                         lower_batches=inner, upper_batches=outer)
        return x, single_loop_iteration(method, x, opt, method.init(z0), sched)
    solver = bl.TorchOptim(torch.optim.SGD, s["inner_steps"], batches=inner, lr=s["inner_lr"])
    lower = bl.LowerProblem(P.g, solver=solver)
    strategy = (bl.AmIGO(inner, steps=s["v_steps"], step_size=s["v_lr"]) if name == "AmIGO"
                else bl.StocBiO(inner, steps=s["terms"], step_size=s["v_lr"]))
    return x, solve_iteration(lower, strategy, P.f, outer, x, opt, z0)


def reach(curve: List[List[float]]) -> Dict[str, Any]:
    """The first checkpoint iteration at which ||grad h||^2 <= each target, and the curve thinned to ~100 log-spaced
    checkpoints for the JSON."""
    keep = sorted({0, len(curve) - 1, *np.geomspace(1, max(len(curve) - 1, 1), 100).astype(int).tolist()})
    return {"iterations_to": {f"{t:g}": next((int(it) for it, v in curve if v <= t), None) for t in TARGETS},
            "curve": [curve[i] for i in keep]}


def timing(wall: List[float], cpu: List[float], per: int) -> Dict[str, float]:
    n = len(wall) * per
    return {"ms_per_it_wall": 1e3 * sum(wall) / n, "ms_per_it_cpu": 1e3 * sum(cpu) / n,
            "ms_per_it_wall_median_chunk": 1e3 * float(np.median(wall)) / per, "cpu_over_wall": sum(cpu) / sum(wall)}


def run_torch(name: str, P: SimpleNamespace, which: str, inner_starts, outer_starts, iterations: int,
              every: int) -> Dict[str, Any]:
    from benchmarks.quadratic_problem import metrics

    s = steps_config(name, which)
    x, iteration = build(name, P, s, Starts(inner_starts), Starts(outer_starts))
    curve, xs, wall, cpu = [[0, metrics(P, x)["grad_norm2"]]], [x.detach().tolist()], [], []
    for k in range(iterations // every):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(every):
            iteration()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        curve.append([(k + 1) * every, metrics(P, x)["grad_norm2"]])
        xs.append(x.detach().tolist())
        if not math.isfinite(curve[-1][1]) or curve[-1][1] > 1e6:
            break
    return {"side": "bilevel (torch)", "method": name, "steps": which, "step_config": s, "iterations": len(wall) * every,
            "x": xs, **reach(curve), **timing(wall, cpu, every)}


def jax_summary(run: Dict[str, Any], P: SimpleNamespace, every: int) -> Dict[str, Any]:
    import torch

    from benchmarks.quadratic_problem import metrics

    curve = [[k * every, metrics(P, torch.tensor(x))["grad_norm2"]] for k, x in enumerate(run["x"])]
    return {"side": "benchopt (JAX)", "method": run["method"], "steps": "benchopt", "iterations": (len(curve) - 1) * every,
            "x": run["x"], **reach(curve), **timing(run["chunk_wall_s"], run["chunk_cpu_s"], every),
            "benchopt_float32_metric_max_rel_diff": max(abs(a - v) / v for a, (_, v) in zip(run["benchopt_metric"], curve[1:]))}


def instance_info(P: SimpleNamespace) -> Dict[str, Any]:
    import torch

    from benchmarks.quadratic_problem import metrics

    lo, hi = (float(e) for e in torch.linalg.eigvalsh(P.reduced_hessian.double())[[0, -1]])
    return {"n_inner": P.n_inner, "n_outer": P.n_outer, "p": P.p, "d": P.d, "reduced_hessian_eigs": [lo, hi],
            "reduced_hessian_cond": hi / lo, "grad_norm2_at_x0": metrics(P, torch.full((P.d,), -2.0))["grad_norm2"]}


def agreement(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    """Largest relative distance between the two runs' x over the common checkpoints."""
    xa, xb = np.asarray(a["x"]), np.asarray(b["x"])
    n = min(len(xa), len(xb))
    return float(np.max(np.linalg.norm(xa[:n] - xb[:n], axis=1) / np.linalg.norm(xb[:n], axis=1)))


def factors(runs: Dict[str, Dict[str, Any]], target: str) -> Dict[str, Any]:
    """Time to ``target`` along the chain JAX (benchopt) -> torch, all else equal (b) -> our steps (c) -> our instance
    (d, iterations) -> rank-one oracle (ms of d): each ratio changes one thing and their product is JAX / (d)."""
    it = {k: r["iterations_to"][target] for k, r in runs.items()}
    out: Dict[str, Any] = {"target": target, "iterations": it}
    if any(it.get(k) is None for k in ("torch_benchopt", "torch_ours", "ours_instance")):
        return out
    out["steps_iterations"], out["instance"] = it["torch_benchopt"] / it["torch_ours"], it["torch_ours"] / it["ours_instance"]
    for clock in ("wall", "cpu"):
        t = {k: (it[k] * r[f"ms_per_it_{clock}"] / 1e3 if it[k] is not None else None) for k, r in runs.items()}
        ms = {k: r[f"ms_per_it_{clock}"] for k, r in runs.items()}
        f = {"steps": t["torch_benchopt"] / t["torch_ours"], "oracle": ms["torch_ours"] / ms["ours_instance"],
             "time_s": t}
        if t.get("jax") is not None:
            f["framework"], f["product"] = t["jax"] / t["torch_benchopt"], t["jax"] / t["ours_instance"]
        out[clock] = f
    return out


def write_markdown(path: Path, rows: List[Dict[str, Any]]) -> str:
    """The two tables of the .md, from the JSON's rows (runs, then factors)."""
    from benchmarks.common import markdown_table

    md = markdown_table(["method", "random_state", "run", "steps", *(f"it. to {t:g}" for t in TARGETS), "ms/it wall",
                         "ms/it CPU", "CPU/wall"], [[w["method"], w["random_state"], k, r["steps"], *r["iterations_to"].values(),
                                                     r["ms_per_it_wall"], r["ms_per_it_cpu"], r["cpu_over_wall"]]
                                                    for w in rows for k, r in w["runs"].items()])
    frows = [[r["method"], r["random_state"], t, f.get("steps_iterations"), f.get("instance"),
              *(f.get("cpu", {}).get(k) for k in ("framework", "steps", "oracle", "product")), f.get("wall", {}).get("product")]
             for r in rows for t, f in r["factors"].items()]
    md += "\n\nFactors of the time to target (one thing changed at a time; product = benchopt JAX / ours end to end):\n\n"
    md += markdown_table(["method", "random_state", "target", "steps (iterations)", "instance (iterations)",
                          "framework JAX/torch (CPU)", "steps (CPU time)", "oracle dense/rank-one (CPU)", "product (CPU)",
                          "product (wall)"], frows)
    path.write_text(md + "\n", encoding="utf-8")
    return md


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--benchopt-dir", type=Path, help="a checkout of benchopt/benchmark_bilevel")
    ap.add_argument("--benchopt-ref", default=None, help="the checkout's commit, recorded in the JSON")
    ap.add_argument("--jax-python", help="a Python with jax and benchopt installed (runs benchopt's side)")
    ap.add_argument("--instance", type=Path, default=None, help="the .npz of benchopt's instance (written by the worker)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--random-states", default="1", help="solver random_state(s) (benchopt's samplers' keys)")
    ap.add_argument("--eval-every", type=int, default=16, help="iterations between checkpoints (benchopt's eval_freq)")
    ap.add_argument("--iterations", default=None, help="iterations per method, e.g. SOBA=8192,AmIGO=1024")
    ap.add_argument("--tiny", action="store_true", help="small instance, few iterations (smoke test)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.worker:
        return jax_worker(json.loads(args.worker.read_text()))
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from benchmarks.common import RESULTS_DIR, load_average, machine_info, write_json
    from benchmarks.quadratic_problem import make_problem

    torch.set_num_threads(1)
    out = args.out or RESULTS_DIR / "benchopt_quadratic_cpu.json"
    methods = [m for m in args.methods.split(",") if m]
    states = [int(s) for s in args.random_states.split(",")]
    iters = {**ITERATIONS, **({m: 64 for m in METHODS} if args.tiny else {})}
    iters.update({k: int(v) for k, v in (kv.split("=") for kv in (args.iterations or "").split(",") if kv)})
    every = args.eval_every
    dataset = TINY_DATASET if args.tiny else DATASET
    draws = {"inner": max(iters[m] * INNER_DRAWS[m] for m in methods) + 64, "outer": max(iters[m] for m in methods) + 64}
    results: Dict[str, Any] = {"benchmark": "benchopt_quadratic", "tiny": args.tiny, "machine": machine_info("cpu"),
                               "affinity": sorted(os.sched_getaffinity(0)), "load_average_start": load_average(),
                               "dataset": dataset, "benchopt_hyperparameters": BENCHOPT, "eval_every": every,
                               "iterations": {m: iters[m] for m in methods}, "random_states": states}
    jax_runs: List[Dict[str, Any]] = []
    if args.jax_python and args.benchopt_dir:
        work = Path(tempfile.gettempdir()) / "benchopt_quadratic" if args.instance is None else args.instance.parent
        work.mkdir(parents=True, exist_ok=True)
        instance = args.instance or work / ("instance_tiny.npz" if args.tiny else "instance.npz")
        spec = {"benchopt_dir": str(args.benchopt_dir.resolve()), "cache_dir": str(work.resolve()), "dataset": dataset,
                "random_states": states, "draws": draws, "instance": str(instance.resolve()), "methods": methods,
                "iterations": iters, "eval_every": every, "result": str((work / "jax.json").resolve())}
        (work / "spec.json").write_text(json.dumps(spec))
        print(f"benchopt's side: {args.jax_python} (instance -> {instance})", flush=True)
        subprocess.run([args.jax_python, str(Path(__file__).resolve()), "--worker", str((work / "spec.json").resolve())],
                       check=True)
        jax_res = json.loads((work / "jax.json").read_text())
        jax_runs = jax_res.pop("runs")
        results["benchopt_side"] = {**jax_res, "benchopt_ref": args.benchopt_ref}
    else:
        instance = args.instance
        print("benchopt's side skipped: give --benchopt-dir and --jax-python to run benchopt's JAX solvers", flush=True)
    if instance is not None and instance.exists():
        with np.load(instance) as npz:
            arrays = {k: npz[k] for k in npz.files}
        results["instance"] = {"source": "benchopt's generator (datasets/simulated.py, its keys)", "file": str(instance)}
    else:
        arrays = recipe_instance(dataset)
        results["instance"] = {"source": "benchopt's recipe, our own random numbers (no JAX run: NOT benchopt's numbers)"}
    P = dense_problem(arrays)
    Q = make_problem(n_inner=dataset["n_samples_inner"], n_outer=dataset["n_samples_outer"], p=dataset["dim_inner"],
                     d=dataset["dim_outer"])
    results["instance"].update(instance_info(P))
    results["our_instance"] = {"source": "quadratic_problem.make_problem(seed=0), rank-one oracle", **instance_info(Q)}
    print(f"benchopt's instance: {results['instance']}\nour instance: {results['our_instance']}", flush=True)
    rows = []
    for name in methods:
        for rs in states:
            si = arrays.get(f"starts_inner_{rs}", contiguous_starts(P.n_inner, draws["inner"], rs))
            so = arrays.get(f"starts_outer_{rs}", contiguous_starts(P.n_outer, draws["outer"], rs + 1000))
            mine_i = contiguous_starts(Q.n_inner, draws["inner"], rs)
            mine_o = contiguous_starts(Q.n_outer, draws["outer"], rs + 1000)
            runs: Dict[str, Dict[str, Any]] = {}
            jr = next((r for r in jax_runs if r["method"] == name and r["random_state"] == rs), None)
            if jr is not None:
                runs["jax"] = jax_summary(jr, P, every)
            runs["torch_benchopt"] = run_torch(name, P, "benchopt", si, so, iters[name], every)
            runs["torch_ours"] = run_torch(name, P, "ours", si, so, iters[name], every)
            runs["ours_instance"] = run_torch(name, Q, "ours", mine_i, mine_o, iters[name], every)
            runs["ours_instance_benchopt_steps"] = run_torch(name, Q, "benchopt", mine_i, mine_o, iters[name], every)
            row = {"method": name, "random_state": rs, "runs": runs,
                   "x_max_rel_diff_torch_vs_jax": agreement(runs["torch_benchopt"], runs["jax"]) if "jax" in runs else None,
                   "factors": {f"{t:g}": factors(runs, f"{t:g}") for t in TARGETS}}
            rows.append(row)
            for k, r in runs.items():
                r.pop("x")
                r.update(instance="ours (cond 18, rank-one)" if k.startswith("ours_instance") else "benchopt's (dense)")
                print(f"{name:8s} rs={rs} {k:28s} to {r['iterations_to']}  {r['ms_per_it_wall']:.3f} ms/it wall "
                      f"{r['ms_per_it_cpu']:.3f} cpu", flush=True)
            print(f"  max relative |x_torch - x_jax| over checkpoints: {row['x_max_rel_diff_torch_vs_jax']}", flush=True)
    results["rows"], results["load_average_end"] = rows, load_average()
    path = write_json(out, results)
    md = write_markdown(path.with_suffix(".md"), rows)
    print("\n" + md + f"\n\nwrote {path} and {path.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
