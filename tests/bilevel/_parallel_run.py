"""Run every stochastic method for 20 iterations on the stochastic quadratic, on one rank of a gloo group or in
one process, and save the iterates: ``python _parallel_run.py RANK WORLD PORT OUT`` (WORLD = 1: no group)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _stochastic_quadratic import stochastic_quadratic  # noqa: E402

import bilevel as bl  # noqa: E402
from bilevel.stochastic import DataParallel  # noqa: E402

GLOBAL_BATCH, ITERATIONS = 32, 20


def run(parallel: Optional[DataParallel]) -> Dict[str, Any]:
    torch.set_default_dtype(torch.float64)
    P = stochastic_quadratic()
    out: Dict[str, Any] = {}

    def batches(seed: int) -> bl.RandomBatches:
        return bl.RandomBatches(P.N, GLOBAL_BATCH, seed=seed, parallel=parallel)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t if parallel is None else parallel.mean([t])[0]

    single = {"soba": (bl.SOBA, {}), "f2sa": (bl.F2SA, {"lam": 2.0}), "bome": (bl.BOME, {"inner_steps": 3})}
    for name, (method, options) in single.items():
        algo = method(bl.LowerProblem(P.g), P.f, step_size=0.2, lower_batches=batches(1), upper_batches=batches(2),
                      parallel=parallel, **options)
        x, state = torch.zeros(P.m), algo.init(torch.zeros(P.n))
        for _ in range(ITERATIONS):
            d = algo.step(x, state)
            x = x - 0.1 * d
        out[name] = {"x": x, "y": state.y, "v": state.v, "z": state.z, "direction": d}
    implicit = {
        "torch_optim_implicit": lambda: bl.Implicit(bl.CG(maxiter=10), check=None),
        "torch_optim_first_order": lambda: bl.FirstOrder(),
        "amigo": lambda: bl.AmIGO(batches(3), steps=3, step_size=0.3, parallel=parallel),
        "stocbio": lambda: bl.StocBiO(batches(3), steps=4, step_size=0.3, parallel=parallel),
    }
    for name, make in implicit.items():
        solver = bl.TorchOptim(torch.optim.SGD, 5, batches=batches(1), parallel=parallel, lr=0.3, momentum=0.5)
        lower, strategy, upper = bl.LowerProblem(P.g, solver=solver), make(), batches(2)
        x, y = torch.zeros(P.m, requires_grad=True), torch.zeros(P.n)
        for _ in range(ITERATIONS):
            y = bl.solve(lower, x, y.detach(), strategy)
            P.f(x, y, upper()).backward()
            with torch.no_grad():
                grad = mean(x.grad)  # the user's part: average the upper gradient (DDP does this for modules)
                x -= 0.1 * grad
            x.grad = None
        out[name] = {"x": x.detach(), "y": y.detach(), "direction": grad}
    # Unrolled over the differentiable SGD: the averaged batch gradients stay in the graph
    lower = bl.LowerProblem(P.g, solver=bl.SGD(0.3, 5, momentum=0.5, batches=batches(1), parallel=parallel))
    upper = batches(2)
    x, y = torch.zeros(P.m, requires_grad=True), torch.zeros(P.n)
    for _ in range(ITERATIONS):
        y = bl.solve(lower, x, y.detach(), bl.Unrolled())
        P.f(x, y, upper()).backward()
        with torch.no_grad():
            grad = mean(x.grad)
            x -= 0.1 * grad
        x.grad = None
    out["sgd_unrolled"] = {"x": x.detach(), "y": y.detach(), "direction": grad}
    out["soba_resumed"] = resumed_soba(P, parallel, batches)
    return out


def resumed_soba(P: Any, parallel: Optional[DataParallel], batches: Any) -> Dict[str, Any]:
    """SOBA stopped after 10 iterations (rank 0 writes x, the state and both samplers), then restored on every
    rank from the file and run 10 more: the same computation as 20 uninterrupted iterations."""
    def build() -> Any:
        return bl.SOBA(bl.LowerProblem(P.g), P.f, step_size=0.2, lower_batches=batches(1), upper_batches=batches(2),
                       parallel=parallel)

    algo = build()
    x, state = torch.zeros(P.m), algo.init(torch.zeros(P.n))
    for _ in range(ITERATIONS // 2):
        x = x - 0.1 * algo.step(x, state)
    ckpt = Path(sys.argv[4] + ".ckpt")
    if parallel is None or parallel.rank == 0:
        torch.save({"x": x, "state": state.state_dict(), "lower": algo.lower_batches.state_dict(),
                    "upper": algo.upper_batches.state_dict()}, ckpt)
    if parallel is not None:
        dist.barrier()
    saved = torch.load(ckpt)
    algo = build()
    state = algo.init(torch.zeros(P.n))
    state.load_state_dict(saved["state"])
    algo.lower_batches.load_state_dict(saved["lower"])
    algo.upper_batches.load_state_dict(saved["upper"])
    x = saved["x"]
    for _ in range(ITERATIONS - ITERATIONS // 2):
        d = algo.step(x, state)
        x = x - 0.1 * d
    return {"x": x, "y": state.y, "v": state.v, "z": state.z, "direction": d}


def main() -> None:
    rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if world == 1:
        torch.save(run(None), path)
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run(DataParallel())
        if rank == 0:
            torch.save(result, path)
        dist.barrier()  # no rank leaves the group while another still talks to it (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
