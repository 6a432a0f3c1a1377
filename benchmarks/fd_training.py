"""Fast-BAT with the exact implicit gradient vs the finite-difference one, trained end to end.

Runs ``python -m applications.adversarial.train`` once per (products, seed) on one config (default: the
quickstart, MNIST), one run after another, and writes the clean / robust test accuracy of every run and
their mean and spread per ``products`` to JSON. ``--collect`` re-reads finished runs without training.

    python benchmarks/fd_training.py --seeds 0 1 2 --products exact forward \\
        --runs /tmp/fd_training --json benchmarks/results/fd_training_quickstart_cpu.json

(The recorded JSON used the quickstart's earlier recipe, 10 epochs of batch 128; the quickstart now trains
15 epochs of batch 64 and adds AutoAttack: append the overrides ``train.epochs=10 train.batch_size=128
eval.autoattack_n=null`` to reproduce it.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, load_average, machine_info, write_json

__all__ = ["run_name", "train_one", "summarize", "main"]

ROOT = Path(__file__).resolve().parent.parent


def run_name(products: str, seed: int) -> str:
    """The run directory's name of one (products, seed) run."""
    return f"{products}_s{seed}"


def train_one(runs: Path, products: str, seed: int, config: Optional[Path], overrides: Sequence[str]) -> Path:
    """Train one run (a subprocess of the trainer, in this repository) and return its directory."""
    cmd = [sys.executable, "-m", "applications.adversarial.train", "--no-progress"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += [f"seed={seed}", f"method.products={products}", f"output.dir={runs}", f"output.name={run_name(products, seed)}",
            "output.overwrite=true", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return runs / run_name(products, seed)


def _stats(values: List[float]) -> Dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: Path, products: Sequence[str], seeds: Sequence[int]) -> Dict[str, Any]:
    """Per-run test accuracies (best and last checkpoint) and, per products, their mean, sample std, range."""
    rows: List[Dict[str, Any]] = []
    for p in products:
        for s in seeds:
            path = runs / run_name(p, s) / "results.json"
            if not path.is_file():
                continue
            res = json.loads(path.read_text())
            row = {"products": p, "seed": s, "epochs": res["epochs_completed"], "train_time_s": res["train_time_s"],
                   "test_attack": res["test_attack"]}
            for ck in ("best", "last"):
                row[f"{ck}_clean_acc"] = res["test"][ck]["clean_acc"]
                row[f"{ck}_robust_acc"] = res["test"][ck]["robust_acc"]
            rows.append(row)
    summary = {}
    for p in products:
        mine = [r for r in rows if r["products"] == p]
        if mine:
            summary[p] = {k: _stats([r[k] for r in mine]) for k in
                          ("best_clean_acc", "best_robust_acc", "last_clean_acc", "last_robust_acc", "train_time_s")}
    return {"runs": rows, "summary": summary}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="training config (default: the quickstart)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--products", nargs="+", default=["exact", "forward"], help="names of methods.PRODUCTS")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/fd_training"), help="folder of the run directories")
    ap.add_argument("--json", type=Path, default=RESULTS_DIR / "fd_training_quickstart_cpu.json")
    ap.add_argument("--collect", action="store_true", help="only summarize finished runs")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key.sub=value)")
    args = ap.parse_args(argv)
    load_start, t0 = load_average(), time.time()
    if not args.collect:
        for seed in args.seeds:  # seed-major: a partial sweep still compares the products on equal seeds
            for p in args.products:
                train_one(args.runs, p, seed, args.config, args.overrides)
    out = summarize(args.runs, args.products, args.seeds)
    out.update({"config": str(args.config or "applications/adversarial/configs/quickstart.yaml"),
                "overrides": list(args.overrides), "seeds": list(args.seeds), "machine": machine_info("cpu"),
                "load_average": {"start": load_start, "end": load_average()}, "wall_s": time.time() - t0})
    for p, s in out["summary"].items():
        print(f"{p:8s} n={s['last_robust_acc']['n']}  last clean {s['last_clean_acc']['mean']:.4f} "
              f"± {s['last_clean_acc']['std']:.4f}  robust {s['last_robust_acc']['mean']:.4f} "
              f"± {s['last_robust_acc']['std']:.4f}  | best clean {s['best_clean_acc']['mean']:.4f} "
              f"robust {s['best_robust_acc']['mean']:.4f}  train {s['train_time_s']['mean']:.0f}s")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
