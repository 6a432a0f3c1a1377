r"""The cost of :class:`bilevel.Implicit`'s default convergence check on a training step.

One iMAML meta-step (Rajeswaran et al., 2019) on sinusoid regression: a ReLU MLP 1-40-40-1, lower problem
:math:`g(\theta, w) = \mathrm{MSE}_{support}(w) + \tfrac{\lambda}{2}\|w - \theta\|^2` solved by gradient
descent from :math:`\theta`, implicit hypergradient by CG, the query loss's backward pass and an Adam step on
:math:`\theta`. Three variants of the same step, timed round-robin in one run (:mod:`benchmarks.common`):

* ``check=None`` (no check);
* ``ConvergenceCheck(every=1)``: every solve checked, the cost of one checked step (two extra gradients of
  :math:`g` and one host synchronization);
* the default, ``ConvergenceCheck()`` (every 100th solve): timed as blocks of 100 meta-steps against blocks
  of 100 unchecked ones, so the measured ratio is the amortized overhead.

Run: ``python benchmarks/convergence_check.py`` (about a minute on 2 cores), ``--tiny`` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, machine_info, markdown_table, time_interleaved, write_json  # noqa: E402


def meta_step_factory(check: Any, inner_steps: int, seed: int = 0) -> Callable[[], None]:
    """A closure running one iMAML meta-step on a fresh task with ``Implicit(CG(10), check=check)``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 1))
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    model = bl.functional(net)
    opt = torch.optim.Adam(theta.values(), 1e-3)
    strategy = bl.Implicit(bl.CG(maxiter=10), check=check)
    solver = bl.GradientDescent(0.01, inner_steps)

    def step() -> None:
        amp = 0.1 + 4.9 * torch.rand(1, generator=gen)
        phase = math.pi * torch.rand(1, generator=gen)
        x = 10.0 * torch.rand(20, 1, generator=gen) - 5.0
        y = amp * torch.sin(x - phase)

        def g(th: Dict[str, torch.Tensor], w: Dict[str, torch.Tensor]) -> torch.Tensor:
            return 0.5 * ((model(w, x[:10]) - y[:10]) ** 2).mean() + sum(((w[k] - th[k]) ** 2).sum() for k in w)

        w = bl.solve(bl.LowerProblem(g, solver=solver), theta, {k: v.detach() for k, v in theta.items()}, strategy,
                     check_finite=False)
        ((model(w, x[10:]) - y[10:]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()

    return step


def blocks(step: Callable[[], None], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            step()
    return run


def main(argv: Any = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a smoke run (seconds)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "convergence_check_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    inner, repeats, block = (10, 3, 4) if args.tiny else (100, 15, 100)
    load_before = load_average()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.HypergradientWarning)  # the check's warnings are not what is timed
        none, every1 = meta_step_factory(None, inner), meta_step_factory(bl.ConvergenceCheck(every=1), inner)
        per_step = time_interleaved([none, every1], repeats=repeats, warmup=2)
        default = bl.ConvergenceCheck(every=block)
        blk = time_interleaved([blocks(meta_step_factory(None, inner, 1), block),
                                blocks(meta_step_factory(default, inner, 1), block)], repeats=max(2, repeats // 2),
                               warmup=1)
    result = {
        "what": "iMAML meta-step (ReLU MLP 1-40-40-1, K=10, GD inner steps at 0.01, CG 10, Adam): Implicit(check=None) "
                "vs ConvergenceCheck(every=1) per step, and blocks of `block` steps with check=None vs "
                "ConvergenceCheck(every=block) (the default's amortized cost when block = 100)",
        "tiny": args.tiny, "inner_steps": inner, "block": block, "threads": 1,
        "per_step_s": {"none": per_step[0], "every_1": per_step[1]},
        "checked_step_overhead": per_step[1]["median_s"] / per_step[0]["median_s"] - 1.0,
        "checked_step_overhead_cpu": per_step[1]["cpu_median_s"] / per_step[0]["cpu_median_s"] - 1.0,
        "block_s": {"none": blk[0], "default": blk[1]},
        "amortized_overhead": blk[1]["median_s"] / blk[0]["median_s"] - 1.0,
        "amortized_overhead_cpu": blk[1]["cpu_median_s"] / blk[0]["cpu_median_s"] - 1.0,
        "machine": machine_info(), "load_average_before": load_before, "load_average_after": load_average(),
    }
    rows = [["check=None, per step", per_step[0]["median_s"], "-", per_step[0]["cpu_median_s"], "-"],
            ["ConvergenceCheck(every=1), per step", per_step[1]["median_s"], result["checked_step_overhead"],
             per_step[1]["cpu_median_s"], result["checked_step_overhead_cpu"]],
            [f"check=None, {block} steps", blk[0]["median_s"], "-", blk[0]["cpu_median_s"], "-"],
            [f"ConvergenceCheck(every={block}), {block} steps", blk[1]["median_s"], result["amortized_overhead"],
             blk[1]["cpu_median_s"], result["amortized_overhead_cpu"]]]
    print(markdown_table(["variant", "median wall s", "overhead (wall)", "median CPU s", "overhead (CPU)"], rows))
    if not args.tiny or args.out != RESULTS_DIR / "convergence_check_cpu.json":
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
