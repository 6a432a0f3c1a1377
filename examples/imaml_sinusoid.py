r"""iMAML on sinusoid few-shot regression, beside MAML, first-order MAML and a random initialization.

Tasks (Finn et al. 2017, Sec. 5.1): :math:`y = A \sin(x - \varphi)` with :math:`A \sim U[0.1, 5]`,
:math:`\varphi \sim U[0, \pi]`, inputs :math:`x \sim U[-5, 5]`; each task gives :math:`K = 10` support
and :math:`K` query points. The model is an MLP 1-40-40-1 with ReLUs, its weights a ``{name: tensor}``
tree :math:`\theta` (``bl.parameters(net)``), evaluated with ``bl.functional(net)``.

iMAML (Rajeswaran et al. 2019), for task :math:`i` with support loss :math:`L^s_i` and query loss
:math:`L^q_i` (mean squared errors):

.. math::

    \min_\theta \frac1B \sum_{i=1}^B L^q_i(w_i^\star(\theta)), \qquad
    w_i^\star(\theta) = \arg\min_w\; g_i(\theta, w) = L^s_i(w) + \tfrac{\lambda}{2}\lVert w - \theta\rVert^2 .

``bl.GradientDescent`` solves the lower problem from ``init = theta``; ``bl.Implicit(bl.CG(m))``
differentiates its optimality condition: :math:`\nabla_\theta L^q_i = \lambda (H_i + \lambda I)^{-1}
\nabla_w L^q_i(w_i^\star)`, :math:`H_i = \nabla^2 L^s_i(w_i^\star)`. The meta-batch of :math:`B` tasks
is one ``torch.func.vmap(torch.func.grad(task_loss), in_dims=(None, 0, 0, 0, 0))`` with :math:`\theta`
shared; the meta-gradient is the *mean* over the batch and Adam takes the step.

Beside it, on the same tasks and number of meta-steps: MAML (no proximal term; ``bl.SGD`` for
``maml_steps`` steps from :math:`\theta`, differentiated by ``bl.Unrolled()``), first-order MAML
(``bl.FirstOrder(through_init=True)``: the query gradient at the adapted weights), and the random
initialization. Evaluation (the MAML paper's Fig. 2-3 protocol): on ``eval_tasks`` held-out tasks
(fixed seed), plain gradient steps on the :math:`K` support points at the inner learning rate
:math:`\alpha`, MSE on ``eval_points`` query points after 0..10 steps.

Run ``python examples/imaml_sinusoid.py`` (full size, about 10 minutes on 2 CPU cores) or ``--tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bilevel as bl  # noqa: E402

__all__ = ["Config", "Tasks", "make_net", "sample_tasks", "task_loss", "meta_gradient", "adaptation_curve",
           "train", "own_adaptation", "run", "machine", "main", "METHODS"]

Params = Dict[str, torch.Tensor]
METHODS = ("imaml", "maml", "fomaml")
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Config:
    """Sizes and hyperparameters (full size by default; :meth:`tiny` for the test)."""

    meta_steps: int = 600
    meta_batch: int = 25          # tasks per meta-step (the MAML paper's 25)
    k: int = 10                   # support and query points per task
    meta_lr: float = 3e-3         # Adam on theta (the MAML paper: 1e-3 over 70,000 steps; 1e-2 diverged iMAML)
    inner_lr: float = 0.01        # alpha: MAML's inner step and the evaluation's adaptation step
    maml_steps: int = 5           # inner SGD steps of MAML / FOMAML during meta-training
    lam: float = 4.0              # iMAML's proximal weight lambda
    imaml_step: float = 0.005     # iMAML's lower gradient-descent step (0.01 diverged once theta sharpened)
    imaml_steps: int = 150        # iMAML's lower gradient-descent steps
    cg_iters: int = 10            # CG iterations of the implicit hypergradient
    eval_tasks: int = 500
    eval_points: int = 100        # query points per held-out task
    eval_steps: int = 10          # adaptation steps at evaluation
    eval_every: int = 50          # meta-steps between two evaluations (the curve)
    hidden: int = 40
    seed: int = 0
    eval_seed: int = 12345

    @staticmethod
    def tiny() -> Config:
        """Seconds on 2 cores: enough meta-steps to beat the random initialization by a clear margin."""
        return Config(meta_steps=40, meta_batch=5, imaml_step=0.01, imaml_steps=30, cg_iters=5, eval_tasks=100,
                      eval_points=50, eval_every=20, meta_lr=1e-2)


@dataclass
class Tasks:
    """A batch of sinusoid tasks: support ``xs, ys`` (n, k, 1) and query ``xq, yq`` (n, m, 1)."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    def __getitem__(self, i: slice) -> Tasks:
        return Tasks(self.xs[i], self.ys[i], self.xq[i], self.yq[i])

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return self.xs, self.ys, self.xq, self.yq


def sample_tasks(n: int, k: int, m: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tasks:
    """``n`` tasks: amplitude U[0.1, 5], phase U[0, pi], inputs U[-5, 5]; ``k`` support and ``m`` query points."""
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=generator, dtype=dtype)
    phase = math.pi * torch.rand(n, 1, 1, generator=generator, dtype=dtype)
    x = -5.0 + 10.0 * torch.rand(n, k + m, 1, generator=generator, dtype=dtype)
    y = amp * torch.sin(x - phase)
    return Tasks(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def make_net(hidden: int = 40, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The MLP 1-hidden-hidden-1 with ReLUs (PyTorch's default initialization, seeded)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1)).to(dtype)


def _mse(fn: Callable, w: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (fn(w, x) - y).square().mean()


def task_loss(method: str, cfg: Config, fn: Callable, theta: Params, xs: torch.Tensor, ys: torch.Tensor,
              xq: torch.Tensor, yq: torch.Tensor, strategy: Optional[bl.Strategy] = None) -> torch.Tensor:
    r"""One task's query loss :math:`L^q(w^\star(\theta))` after the method's adaptation from :math:`\theta`.

    ``imaml``: :math:`g = L^s(w) + \frac{\lambda}{2}\lVert w - \theta\rVert^2`, ``GradientDescent``,
    ``strategy`` (default ``Implicit(CG(cg_iters))``). ``maml`` / ``fomaml``: :math:`g = L^s(w)`,
    ``SGD(inner_lr, maml_steps)``, ``Unrolled()`` (on the displacement :math:`w - \theta`) /
    ``FirstOrder(through_init=True)``.
    """
    if method == "imaml":
        def g(th: Params, w: Params) -> torch.Tensor:
            prox = sum((w[n] - th[n]).square().sum() for n in w)
            return _mse(fn, w, xs, ys) + 0.5 * cfg.lam * prox
        lower = bl.LowerProblem(g, solver=bl.GradientDescent(cfg.imaml_step, cfg.imaml_steps))
        strategy = strategy if strategy is not None else bl.Implicit(bl.CG(maxiter=cfg.cg_iters))
    elif method == "maml":
        # The lower variable is the displacement d = w - theta: d_{k+1} = d_k - alpha grad L^s(theta + d_k), d_0 = 0,
        # the same iterates as MAML's w_k = theta + d_k. (A full Unrolled also differentiates through init, so
        # solve(lower, theta, theta, Unrolled()) on L^s(w) is equivalent; this form produced the committed numbers.)
        lower = bl.LowerProblem(lambda th, d: _mse(fn, _shift(th, d), xs, ys), solver=bl.SGD(cfg.inner_lr, cfg.maml_steps))
        d = bl.solve(lower, theta, {n: torch.zeros_like(t) for n, t in theta.items()}, bl.Unrolled(), check_finite=False)
        return _mse(fn, _shift(theta, d), xq, yq)
    elif method == "fomaml":
        lower = bl.LowerProblem(lambda th, w: _mse(fn, w, xs, ys), solver=bl.SGD(cfg.inner_lr, cfg.maml_steps))
        strategy = bl.FirstOrder(through_init=True)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    w = bl.solve(lower, theta, theta, strategy, check_finite=False)
    return _mse(fn, w, xq, yq)


def _shift(theta: Params, d: Params) -> Params:
    return {n: theta[n] + d[n] for n in theta}


def meta_gradient(method: str, cfg: Config, fn: Callable, theta: Params, tasks: Tasks,
                  strategy: Optional[bl.Strategy] = None, loop: bool = False) -> Tuple[Params, torch.Tensor]:
    r"""Mean over the batch of :math:`\nabla_\theta L^q_i(w_i^\star(\theta))`, and the mean query loss.

    One ``vmap`` over the tasks with ``theta`` shared (``loop=True``: a Python loop over them instead).
    """
    def one(th: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        return task_loss(method, cfg, fn, th, xs, ys, xq, yq, strategy)

    value_and_grad = torch.func.grad_and_value(one)
    if loop:
        outs = [value_and_grad(theta, *(t[i] for t in tasks.tensors())) for i in range(tasks.xs.shape[0])]
        grads = {n: torch.stack([o[0][n] for o in outs]) for n in theta}
        losses = torch.stack([o[1] for o in outs])
    else:
        grads, losses = torch.func.vmap(value_and_grad, in_dims=(None, 0, 0, 0, 0))(theta, *tasks.tensors())
    return {n: gr.mean(0) for n, gr in grads.items()}, losses.mean()


def adaptation_curve(fn: Callable, theta: Params, tasks: Tasks, lr: float, steps: int) -> List[float]:
    """Mean query MSE over ``tasks`` after 0..``steps`` plain gradient steps on the support MSE (step ``lr``)."""
    def one(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        w, out = theta, [_mse(fn, theta, xq, yq)]
        for _ in range(steps):
            gr = torch.func.grad(lambda p: _mse(fn, p, xs, ys))(w)
            w = {n: w[n] - lr * gr[n] for n in w}
            out.append(_mse(fn, w, xq, yq))
        return torch.stack(out)
    with torch.no_grad():
        return [float(v) for v in torch.func.vmap(one)(*tasks.tensors()).mean(0)]


def train(method: str, cfg: Config, eval_tasks: Tasks, log: Callable[[str], None] = print) -> Dict:
    """Meta-train ``theta`` from the seeded initialization; the curve of held-out MSE against meta-steps."""
    net = make_net(cfg.hidden, cfg.seed)
    fn = bl.functional(net)
    theta = {n: p.requires_grad_() for n, p in bl.parameters(net).items()}
    opt = torch.optim.Adam(theta.values(), lr=cfg.meta_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same meta-batches for every method
    strategy = bl.Implicit(bl.CG(maxiter=cfg.cg_iters)) if method == "imaml" else None
    curve: List[Dict] = []
    n_warn, n_skipped, t_train, cpu_train, start = 0, 0, 0.0, 0.0, time.perf_counter()
    for step in range(cfg.meta_steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.meta_steps:
            detached = {n: p.detach() for n, p in theta.items()}
            mse = adaptation_curve(fn, detached, eval_tasks, cfg.inner_lr, cfg.eval_steps)
            curve.append({"meta_step": step, "mse_1": mse[1], "mse_10": mse[min(10, cfg.eval_steps)],
                          "train_s": round(t_train, 2)})
            log(f"  {method:7s} step {step:5d}  held-out MSE after 1 / {cfg.eval_steps} steps "
                f"{mse[1]:.3f} / {mse[-1]:.3f}  ({t_train:.1f} s)")
        if step == cfg.meta_steps:
            break
        tasks = sample_tasks(cfg.meta_batch, cfg.k, cfg.k, gen)
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", bl.HypergradientWarning)
            grads, _ = meta_gradient(method, cfg, fn, {n: p.detach() for n, p in theta.items()}, tasks, strategy)
        n_warn += sum(issubclass(w.category, bl.HypergradientWarning) for w in caught)
        if all(bool(torch.isfinite(v).all()) for v in grads.values()):
            for n, p in theta.items():
                p.grad = grads[n]
            opt.step()
        else:  # a diverged lower solve in some task: no step, counted
            n_skipped += 1
        t_train, cpu_train = t_train + time.perf_counter() - t0, cpu_train + time.process_time() - c0
    final = adaptation_curve(fn, {n: p.detach() for n, p in theta.items()}, eval_tasks, cfg.inner_lr, cfg.eval_steps)
    out = {"final_mse_by_steps": final, "curve": curve, "train_s": round(t_train, 2),
           "train_cpu_s": round(cpu_train, 2), "wall_s": round(time.perf_counter() - start, 2), "hypergradient_warnings": n_warn,
           "skipped_nonfinite_steps": n_skipped}
    if method == "imaml":
        out["own_adaptation_mse"] = own_adaptation(cfg, fn, {n: p.detach() for n, p in theta.items()}, eval_tasks)
        out["lower_residual"] = _lower_residual(cfg, fn, theta, sample_tasks(cfg.meta_batch, cfg.k, cfg.k, gen), strategy)
    return out


def own_adaptation(cfg: Config, fn: Callable, theta: Params, tasks: Tasks) -> float:
    r"""Held-out MSE after iMAML's own adaptation: the lower problem (proximal term, ``imaml_steps`` GD steps) solved."""
    def one(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        g = lambda th, w: _mse(fn, w, xs, ys) + 0.5 * cfg.lam * sum((w[n] - th[n]).square().sum() for n in w)
        lower = bl.LowerProblem(g, solver=bl.GradientDescent(cfg.imaml_step, cfg.imaml_steps))
        return _mse(fn, bl.solve(lower, theta, theta, bl.FirstOrder(), check_finite=False), xq, yq)
    with torch.no_grad():
        return float(torch.func.vmap(one)(*tasks.tensors()).mean())


def _lower_residual(cfg: Config, fn: Callable, theta: Params, tasks: Tasks, strategy: bl.Implicit) -> Dict:
    r"""At the final :math:`\theta`: per-task :math:`\lVert\nabla_w g(w^\star)\rVert / \lVert\nabla_w g(\theta)\rVert`
    and CG's relative residual (the quantities the default ``ConvergenceCheck`` tests), over one meta-batch."""
    fresh = bl.Implicit(bl.CG(maxiter=cfg.cg_iters), residual=bl.ResidualCheck(step=cfg.imaml_step), check=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.HypergradientWarning)
        meta_gradient("imaml", cfg, fn, {n: p.detach() for n, p in theta.items()}, tasks, fresh)

    def start_residual(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        gr = torch.func.grad(lambda w: _mse(fn, w, xs, ys))(theta)  # at w = theta the proximal term's gradient is 0
        return torch.sqrt(sum(v.square().sum() for v in gr.values()))
    r0 = torch.func.vmap(start_residual)(tasks.xs, tasks.ys)
    ratio = (fresh.last_residual / r0).detach()
    cg = fresh.last_info.relative_residual.detach()
    return {"lower_ratio_median": float(ratio.median()), "lower_ratio_max": float(ratio.max()),
            "cg_relative_residual_median": float(cg.median()), "cg_relative_residual_max": float(cg.max())}


def machine() -> Dict:
    """CPU model (/proc/cpuinfo), cores, torch threads and version, load average."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.lower().startswith("model name")), model)
    except OSError:
        pass
    return {"cpu_model": model, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "loadavg": list(os.getloadavg())}


def run(cfg: Config, methods: Sequence[str] = METHODS, log: Callable[[str], None] = print) -> Dict:
    """Every method on the same meta-batches and held-out tasks; the random initialization as the baseline."""
    eval_tasks = sample_tasks(cfg.eval_tasks, cfg.k, cfg.eval_points, torch.Generator().manual_seed(cfg.eval_seed))
    start, load0 = time.perf_counter(), machine()
    net = make_net(cfg.hidden, cfg.seed)
    results: Dict = {"random_init": {"final_mse_by_steps": adaptation_curve(
        bl.functional(net), bl.parameters(net), eval_tasks, cfg.inner_lr, cfg.eval_steps)}}
    log(f"  random init: held-out MSE after {cfg.eval_steps} steps {results['random_init']['final_mse_by_steps'][-1]:.3f}")
    for method in methods:
        results[method] = train(method, cfg, eval_tasks, log)
    return {"config": asdict(cfg), "methods": results, "machine": load0,
            "loadavg_end": list(os.getloadavg()), "wall_s": round(time.perf_counter() - start, 1),
            "reference": "MAML paper (Finn et al. 2017, Fig. 2-3), K=10: MSE about 0.2-0.4 after about 10 "
                         "adaptation steps, 70,000 meta-iterations of 25 tasks"}


def _plot(data: Dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = data["config"]["eval_steps"]
    colors = {"random_init": "gray", "imaml": "C0", "maml": "C1", "fomaml": "C2"}
    for name, res in data["methods"].items():
        a.plot(range(steps + 1), res["final_mse_by_steps"], marker="o", ms=3, label=name, color=colors.get(name))
        if "curve" in res:
            b.plot([c["meta_step"] for c in res["curve"]], [c["mse_10"] for c in res["curve"]], label=name,
                   color=colors.get(name))
    b.axhline(data["methods"]["random_init"]["final_mse_by_steps"][-1], color="gray", ls="--", label="random_init")
    a.set(xlabel="adaptation steps (gradient, step alpha)", ylabel="held-out MSE", yscale="log",
          title="after meta-training")
    b.set(xlabel="meta-steps", ylabel=f"held-out MSE after {min(10, steps)} steps", yscale="log", title="meta-training")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """CLI: ``--tiny`` (seconds) or the full size; writes ``--out`` (JSON) and a PNG beside it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds (the test's size)")
    p.add_argument("--meta-steps", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of imaml,maml,fomaml")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/imaml_sinusoid.json; "
                   "--tiny: the temporary directory)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.tiny() if args.tiny else Config()
    if args.meta_steps:
        cfg = replace(cfg, meta_steps=args.meta_steps)
    # a tiny run is a smoke test: it writes outside the checkout, which keeps only the full-size results
    out = args.out or (Path(tempfile.gettempdir()) / "imaml_sinusoid_tiny.json" if args.tiny else
                       RESULTS / "imaml_sinusoid.json")
    data = run(cfg, [m for m in args.methods.split(",") if m])
    print(f"{'method':12s} " + " ".join(f"{s:>6d}" for s in range(cfg.eval_steps + 1)) + "   (held-out MSE by adaptation steps)")
    for name, res in data["methods"].items():
        print(f"{name:12s} " + " ".join(f"{v:6.3f}" for v in res["final_mse_by_steps"])
              + (f"   train {res['train_s']:.0f} s" if "train_s" in res else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    png = _plot(data, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return data


if __name__ == "__main__":
    main()
