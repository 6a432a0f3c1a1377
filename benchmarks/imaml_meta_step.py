r"""iMAML meta-step cost on sinusoid regression: ``vmap`` over tasks vs a Python loop, and Betty's iMAML beside it.

The problem and model are those of ``examples/imaml_sinusoid.py`` (MLP 1-40-40-1, :math:`K = 10`); one
meta-step is, for each of :math:`B` tasks, ``imaml_steps`` gradient-descent steps on
:math:`g_i(\theta, w) = L^s_i(w) + \frac{\lambda}{2}\lVert w - \theta\rVert^2` from :math:`w = \theta`, the
implicit hypergradient :math:`\lambda (H_i + \lambda I)^{-1} \nabla_w L^q_i(w_i^\star)` by ``cg_iters`` CG
iterations, the mean over the tasks, and one Adam step on :math:`\theta`.

Three implementations of the same meta-step, timed round-robin on the same meta-batch (median of
``repeats``; ``benchmarks/common.py``'s protocol, one torch thread):

* ``bilevel vmap``: one ``torch.func.vmap(torch.func.grad(task_loss), in_dims=(None, 0, 0, 0, 0))``;
* ``bilevel loop``: ``torch.func.grad(task_loss)`` task by task in Python (same numbers, same code);
* ``Betty``: ``ImplicitProblem`` + ``Engine`` (``Config(type="cg")``), written as Betty's own iMAML example
  writes it: the lower problem's module is reset to the upper one's at the start of each task, ``torch.optim.SGD``
  takes the lower steps, ``gradient_accumulation = B`` on the upper problem (Betty divides each task's loss by
  it: a mean over tasks, as ours); one ``Engine.run`` of ``B * imaml_steps`` iterations is one meta-step.

Then the learning comparison (the issue's observation: Betty's iMAML learned faster over its first 40 meta-steps
than ours): ``meta_steps`` meta-steps from the same initialization on the same meta-batches, held-out MSE (500
tasks, 10 adaptation steps at :math:`\alpha`) after them, for ours with CG(``cg_iters``) and CG(1) and first-order
MAML at Adam rates 1e-3 and 1e-2, and Betty at 1e-3 with ``cg_iterations`` 1 (its default) and ``cg_iters``, and with
1 but without ``gradient_accumulation`` (one Adam step per task); and, at the initialization, each method's
meta-gradient against the exact solve of the same linear systems (``DenseSolve``): cosine and norm ratio.

Run ``python benchmarks/imaml_meta_step.py`` (a few minutes on 2 cores) or ``--tiny``; writes
``benchmarks/results/imaml_meta_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bilevel as bl  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, machine_info, markdown_table, time_interleaved, write_json  # noqa: E402
from examples.imaml_sinusoid import Config, Tasks, adaptation_curve, make_net, meta_gradient, sample_tasks  # noqa: E402

__all__ = ["betty_available", "BettyIMAML", "ours_meta_step", "learning", "gradient_check", "timing", "main"]


def betty_available() -> bool:
    """Whether ``betty`` (betty-ml) imports."""
    try:
        import betty.engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: skip the Betty rows
        return False
    return True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Warnings off (Betty's deprecation notices; the HypergradientWarning is counted in the example, not here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class BettyIMAML:
    """iMAML as a Betty program: ``Outer`` (theta, Adam) over ``Inner`` (w, SGD), CG hypergradient.

    ``accumulate=False`` leaves ``gradient_accumulation`` at Betty's default 1: the upper problem then takes one
    Adam step per task (B steps per meta-batch) instead of one per meta-batch.
    ``run(batches)`` meta-trains on the given meta-batches (one per meta-step) and returns the seconds spent;
    ``grads`` holds theta's gradient at each meta-step (what Adam received), ``theta()`` the current weights.
    """

    def __init__(self, cfg: Config, cg_iterations: int, cg_alpha: float = 1.0, accumulate: bool = True) -> None:
        from betty.configs import Config as BettyConfig
        from betty.problems import ImplicitProblem

        self.cfg, self.tasks, self.task, self.grads = cfg, None, -1, []
        self.keep_grads = False
        outer_net, inner_net = make_net(cfg.hidden, cfg.seed), make_net(cfg.hidden, cfg.seed)
        owner = self

        class Outer(ImplicitProblem):
            def training_step(self, batch: Any) -> torch.Tensor:
                xq, yq = batch
                return (self.inner(xq) - yq).square().mean()

            def get_batch(self) -> Any:
                return owner.tasks.xq[owner.task], owner.tasks.yq[owner.task]

            def custom_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
                if owner.keep_grads:
                    owner.grads.append([p.grad.detach().clone() for p in self.module.parameters()])
                self.optimizer.step()

        class Inner(ImplicitProblem):
            def training_step(self, batch: Any) -> torch.Tensor:
                xs, ys = batch
                prox = sum((w - t).square().sum() for w, t in zip(self.module.parameters(), self.outer.module.parameters()))
                return (self.module(xs) - ys).square().mean() + 0.5 * cfg.lam * prox

            def get_batch(self) -> Any:
                return owner.tasks.xs[owner.task], owner.tasks.ys[owner.task]

            def on_inner_loop_start(self) -> None:
                owner.task += 1  # the next task of the meta-batch; the lower weights restart at theta
                self.module.load_state_dict(self.outer.module.state_dict())

        self.outer = Outer("outer", BettyConfig(retain_graph=True, gradient_accumulation=cfg.meta_batch if accumulate else 1),
                           module=outer_net, optimizer=torch.optim.Adam(outer_net.parameters(), lr=cfg.meta_lr))
        self.inner = Inner("inner", BettyConfig(type="cg", cg_iterations=cg_iterations, cg_alpha=cg_alpha,
                                                unroll_steps=cfg.imaml_steps),
                           module=inner_net, optimizer=torch.optim.SGD(inner_net.parameters(), lr=cfg.imaml_step))
        self.names = [n for n, _ in outer_net.named_parameters()]
        self.engine: Any = None

    def _engine(self, iters: int) -> Any:
        import logging

        from betty.configs import EngineConfig
        from betty.engine import Engine
        from betty.logging.logger_base import get_logger

        get_logger().setLevel(logging.WARNING)  # Betty's INFO lines on every run; its logger is created once
        problems = [self.outer, self.inner]
        deps = {"u2l": {self.outer: [self.inner]}, "l2u": {self.inner: [self.outer]}}
        if self.engine is None:
            self.engine = Engine(config=EngineConfig(train_iters=iters, valid_step=10**9, strategy="cpu"),
                                 problems=problems, dependencies=deps)
        self.engine.train_iters = iters
        return self.engine

    def run(self, batches: Sequence[Tasks]) -> float:
        """Meta-train on ``batches`` (one Betty ``Engine.run`` per meta-step); the seconds it took."""
        total = 0.0
        for tasks in batches:
            self.tasks, self.task = tasks, -1
            engine = self._engine(self.cfg.meta_batch * self.cfg.imaml_steps)
            t0 = time.perf_counter()
            with _quiet():
                engine.run()
            total += time.perf_counter() - t0
        return total

    def theta(self) -> Dict[str, torch.Tensor]:
        """The upper problem's weights, as a ``{name: tensor}`` tree."""
        return {n: p.detach().clone() for n, p in self.outer.module.named_parameters()}


def ours_meta_step(cfg: Config, strategy_fn: Callable[[], bl.Strategy], method: str = "imaml", loop: bool = False):
    """``(theta, step(tasks))``: our meta-step (meta-gradient by vmap or loop, Adam) from the seeded initialization."""
    net = make_net(cfg.hidden, cfg.seed)
    fn = bl.functional(net)
    theta = {n: p.requires_grad_() for n, p in bl.parameters(net).items()}
    opt = torch.optim.Adam(theta.values(), lr=cfg.meta_lr)
    strategy = strategy_fn() if method == "imaml" else None

    def step(tasks: Tasks) -> None:
        with _quiet():
            grads, _ = meta_gradient(method, cfg, fn, {n: p.detach() for n, p in theta.items()}, tasks, strategy, loop)
        for n, p in theta.items():
            p.grad = grads[n]
        opt.step()
    return theta, step


def _time_batch(c: Config, repeats: int, warmup: int, betty: bool) -> Dict:
    tasks = sample_tasks(c.meta_batch, c.k, c.k, torch.Generator().manual_seed(c.seed + 100 + c.meta_batch))
    strategy_fn = lambda: bl.Implicit(bl.CG(maxiter=c.cg_iters))
    _, vm = ours_meta_step(c, strategy_fn)
    _, lp = ours_meta_step(c, strategy_fn, loop=True)
    fns: List[Callable[[], Any]] = [lambda: vm(tasks), lambda: lp(tasks)]
    if betty:
        model = BettyIMAML(c, c.cg_iters)
        fns.append(lambda: model.run([tasks]))
    times = time_interleaved(fns, repeats=repeats, warmup=warmup)
    row = {"meta_batch": c.meta_batch, "vmap_s": times[0]["median_s"], "loop_s": times[1]["median_s"],
           "vmap_cpu_s": times[0]["cpu_median_s"], "loop_cpu_s": times[1]["cpu_median_s"],
           "speedup": times[1]["median_s"] / times[0]["median_s"], "repeats": repeats}
    if betty:
        row["betty_s"], row["betty_cpu_s"] = times[2]["median_s"], times[2]["cpu_median_s"]
    return row


def timing(cfg: Config, sizes: Sequence[int], repeats: int, warmup: int, betty: bool, log=print) -> List[Dict]:
    """Per-meta-step time (median) of vmap, loop and Betty, run round-robin on the same meta-batch."""
    rows = []
    for b in sizes:
        row = _time_batch(replace(cfg, meta_batch=b), repeats, warmup, betty)
        rows.append(row)
        log(f"  B={b}: vmap {row['vmap_s'] * 1e3:.0f} ms, loop {row['loop_s'] * 1e3:.0f} ms "
            f"({row['speedup']:.1f}x)" + (f", Betty {row['betty_s'] * 1e3:.0f} ms" if betty else ""))
    return rows


def gradient_check(cfg: Config, tasks: Tasks, betty: bool) -> List[Dict]:
    r"""Meta-gradients at the initialization on one meta-batch: cosine and norm ratio to ``DenseSolve``'s.

    The reference solves each task's system :math:`(H_i + \lambda I) u = v` exactly (LU of the materialized matrix)
    at the same float32 lower solution :math:`w_i^\star`. The float64 row repeats our CG with the whole meta-step in
    float64: a different rounding of the same problem, which shows how much the lower solution itself moves.
    """
    def flat(tree: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tree[n].reshape(-1).double() for n in sorted(tree)])

    net = make_net(cfg.hidden, cfg.seed)
    fn, theta = bl.functional(net), bl.parameters(net)

    def ours(method: str, strategy: Optional[bl.Strategy] = None) -> torch.Tensor:
        with _quiet():
            return flat(meta_gradient(method, cfg, fn, theta, tasks, strategy)[0])

    ref = ours("imaml", bl.Implicit(bl.DenseSolve()))
    cands: Dict[str, torch.Tensor] = {f"bilevel CG({m})": ours("imaml", bl.Implicit(bl.CG(maxiter=m)))
                                      for m in (cfg.cg_iters, 1)}
    net64 = make_net(cfg.hidden, cfg.seed).double()
    with _quiet():
        cands[f"bilevel CG({cfg.cg_iters}), float64"] = flat(meta_gradient(
            "imaml", cfg, bl.functional(net64), bl.parameters(net64), Tasks(*(t.double() for t in tasks.tensors())),
            bl.Implicit(bl.CG(maxiter=cfg.cg_iters)))[0])
    cands["first-order MAML"] = ours("fomaml")
    # H_i taken as 0: lambda (lambda I)^-1 v = v, the query gradient at w* (passed to theta unchanged)
    cands["query gradient at w* (H = 0)"] = ours("imaml", bl.FirstOrder(through_init=True))
    if betty:
        for m in sorted({1, cfg.cg_iters}):
            model = BettyIMAML(cfg, m)
            model.keep_grads = True
            model.run([tasks])
            cands[f"Betty cg_iterations={m}"] = flat(dict(zip(model.names, model.grads[0])))
    return [{"method": name, "cosine": float(v @ ref / (v.norm() * ref.norm())), "norm_ratio": float(v.norm() / ref.norm()),
             "rel_error": float((v - ref).norm() / ref.norm())} for name, v in cands.items()]


def learning(cfg: Config, betty: bool, lrs: Sequence[float], log=print) -> List[Dict]:
    """``cfg.meta_steps`` meta-steps of each variant on the same meta-batches, at each meta learning rate; held-out MSE.

    Betty runs at the first rate only (cg_iterations 1 and ``cg_iters``, and 1 without gradient accumulation).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = [sample_tasks(cfg.meta_batch, cfg.k, cfg.k, gen) for _ in range(cfg.meta_steps)]
    ev = sample_tasks(cfg.eval_tasks, cfg.k, cfg.eval_points, torch.Generator().manual_seed(cfg.eval_seed))
    fn = bl.functional(make_net(cfg.hidden, cfg.seed))
    evaluate = lambda theta: adaptation_curve(fn, theta, ev, cfg.inner_lr, cfg.eval_steps)[-1]
    rows = [{"method": "random init", "meta_lr": None, "mse_10": evaluate(bl.parameters(make_net(cfg.hidden, cfg.seed))),
             "s_per_step": None}]
    variants: Dict[str, Any] = {
        f"bilevel iMAML CG({cfg.cg_iters})": ("imaml", lambda: bl.Implicit(bl.CG(maxiter=cfg.cg_iters))),
        "bilevel iMAML CG(1)": ("imaml", lambda: bl.Implicit(bl.CG(maxiter=1))),
        "bilevel first-order MAML": ("fomaml", None),
    }
    for k, lr in enumerate(lrs):
        c = replace(cfg, meta_lr=lr)
        for name, (method, strategy_fn) in variants.items():
            theta, step = ours_meta_step(c, strategy_fn, method)
            t0 = time.perf_counter()
            for tasks in batches:
                step(tasks)
            secs = time.perf_counter() - t0
            rows.append({"method": name, "meta_lr": lr, "mse_10": evaluate({n: p.detach() for n, p in theta.items()}),
                         "s_per_step": secs / c.meta_steps})
        for name, m, acc in [("Betty iMAML cg_iterations=1", 1, True),
                             (f"Betty iMAML cg_iterations={c.cg_iters}", c.cg_iters, True),
                             ("Betty iMAML cg_iterations=1, no gradient_accumulation", 1, False)]:
            if betty and k == 0:
                model = BettyIMAML(c, m, accumulate=acc)
                secs = model.run(batches)
                rows.append({"method": name, "meta_lr": lr, "mse_10": evaluate(model.theta()), "s_per_step": secs / c.meta_steps})
        for r in rows[-(len(variants) + (3 if betty and k == 0 else 0)):]:
            log(f"  lr {lr:g} {r['method']}: MSE {r['mse_10']:.3f} ({r['s_per_step'] * 1e3:.0f} ms / meta-step)")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """CLI: ``--tiny`` or full size; prints the tables, writes JSON and markdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="seconds (the test's size)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-betty", action="store_true", help="leave Betty out even if it is importable")
    p.add_argument("--out", type=Path, default=None, help="JSON path (the .md is written beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    betty = betty_available() and not args.no_betty
    if args.tiny:
        cfg = replace(Config.tiny(), meta_steps=2, meta_batch=4, imaml_steps=10, eval_tasks=20)
        sizes, repeats, warmup, lrs = (2, 4), args.repeats or 2, 1, (1e-2,)
    else:
        cfg = replace(Config(), meta_steps=40)
        # 1e-3: the MAML paper's rate (and, from its random-init and iMAML numbers, the issue's); 1e-2: faster
        sizes, repeats, warmup, lrs = (8, 32), args.repeats or 7, 1, (1e-3, 1e-2)
    out = args.out or RESULTS_DIR / ("imaml_meta_step_tiny.json" if args.tiny else "imaml_meta_step.json")
    start, load0 = time.perf_counter(), load_average()
    print("timing (one meta-step):")
    time_rows = timing(cfg, sizes, repeats, warmup, betty)
    print(f"meta-gradient at the initialization (B={cfg.meta_batch}) against DenseSolve:")
    grad_rows = gradient_check(cfg, sample_tasks(cfg.meta_batch, cfg.k, cfg.k, torch.Generator().manual_seed(cfg.seed + 1)),
                               betty)
    for r in grad_rows:
        print(f"  {r['method']:28s} cosine {r['cosine']:.3f}  norm ratio {r['norm_ratio']:.3f}")
    print(f"learning ({cfg.meta_steps} meta-steps of B={cfg.meta_batch}, same batches, Adam lr {lrs}):")
    learn_rows = learning(cfg, betty, lrs)
    data = {"config": asdict(cfg), "betty": betty, "timing": time_rows, "gradient_check": grad_rows,
            "learning": learn_rows, "machine": machine_info("cpu"), "loadavg_start": load0, "loadavg_end": load_average(),
            "wall_s": round(time.perf_counter() - start, 1)}
    md = _markdown(data)
    print(md)
    write_json(out, data)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return data


def _markdown(data: Dict) -> str:
    cfg = data["config"]
    t = markdown_table(["tasks B", "bilevel vmap (ms)", "bilevel loop (ms)", "loop / vmap", "Betty (ms)"],
                       [[r["meta_batch"], r["vmap_s"] * 1e3, r["loop_s"] * 1e3, r["speedup"],
                         r["betty_s"] * 1e3 if "betty_s" in r else None] for r in data["timing"]])
    g = markdown_table(["meta-gradient", "cosine to exact", "norm / exact", "relative error"],
                       [[r["method"], r["cosine"], r["norm_ratio"], r["rel_error"]] for r in data["gradient_check"]])
    learn = markdown_table([f"after {cfg['meta_steps']} meta-steps (B={cfg['meta_batch']})", "Adam lr",
                            "held-out MSE, 10 steps", "s / meta-step"],
                           [[r["method"], r["meta_lr"], r["mse_10"], r["s_per_step"]] for r in data["learning"]])
    m = data["machine"]
    return (f"iMAML meta-step, MLP 1-{cfg['hidden']}-{cfg['hidden']}-1, {cfg['imaml_steps']} lower steps, "
            f"CG({cfg['cg_iters']}), lambda={cfg['lam']}; {m['cpu_model']}, {m['torch_threads']} torch thread(s), "
            f"load {data['loadavg_start']} -> {data['loadavg_end']}, {data['wall_s']} s in all\n\n{t}\n\n{g}\n\n{learn}")


if __name__ == "__main__":
    main()
