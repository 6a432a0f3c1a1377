r"""Reproduce Table 1 of Fast-BAT (CIFAR-10, PreActResNet-18) and the implicit-gradient ablation.

Drives the training program ``applications/adversarial/train.py`` (one subprocess per run) over

* Table 1: ``fast_at`` and ``fast_bat`` at eps = 8/255 and 16/255 (the configs
  ``applications/adversarial/configs/cifar10_{fast_at,fast_bat}_{8,16}.yaml``);
* the IG ablation at 16/255: ``fast_bat`` with ``lam = 1/attack_step`` (the exact implicit gradient),
  ``lam = 10`` (the official value) and ``lam = inf`` (no implicit gradient),

then evaluates the best (by validation robust accuracy) and the last checkpoint of each run: clean accuracy
(SA) and PGD-50-10 robust accuracy from the trainer's final test (``eval.test_steps=50
eval.test_restarts=10``, step eps/4, on ``--test-n`` test images), and standard AutoAttack
(``pyautoattack``) on the first ``--aa-n`` test images. Runs with identical settings are trained once.

Collected per run: seconds per training epoch (the trainer's ``epoch_time_s``, validation excluded), total
training time, wall time of the subprocess, SA / RA-PGD / RA-AA for best and last, the best epoch. Written
to ``results/table1_<device>.json`` and ``results/table1_<device>.md`` (mean ± std over ``--seeds``).

Data: ``--data PATH`` is CIFAR-10 as the JPEG image-folder tarball (``../shared/data/cifar10-jpg.tar.gz``
beside the checkout on the project machines; decoded once by the data loader and cached) or any path the loader accepts.

``--tiny`` (CPU smoke mode): a few hundred images extracted from the same tarball into a temporary archive,
the small CNN instead of PreActResNet-18, one epoch, PGD-3-1 and APGD-CE alone as "AutoAttack" (not RA-AA);
the numbers mean nothing, the pipeline is what it checks.

Run (GPU): ``python benchmarks/reproduce_table1.py --data /path/cifar10-jpg.tar.gz --device cuda --seeds 0``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, write_json  # noqa: E402

TRAIN_PY = REPO / "applications" / "adversarial" / "train.py"
EVALUATE_PY = REPO / "applications" / "adversarial" / "evaluate.py"
CONFIG_DIR = REPO / "applications" / "adversarial" / "configs"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"  # shared/ beside the checkout

#: the paper's Table 1 (arXiv v1; mean over 10 runs, one P100), for the side-by-side columns
PAPER = {
    ("fast_at", 8): {"RA-PGD": 45.47, "RA-AA": 41.97, "SA": 81.72, "s/epoch": 42},
    ("fast_at", 16): {"RA-PGD": 21.79, "RA-AA": 12.57, "SA": 46.02, "s/epoch": 42},
    ("fast_bat", 8): {"RA-PGD": 48.74, "RA-AA": 44.89, "SA": 79.43, "s/epoch": 135},
    ("fast_bat", 16): {"RA-PGD": 26.15, "RA-AA": 18.21, "SA": 67.79, "s/epoch": 135},
}


@dataclass(frozen=True)
class Run:
    """One training configuration: a config file plus overrides."""

    key: str
    method: str
    eps255: int
    config: str
    overrides: Tuple[str, ...] = ()
    groups: Tuple[str, ...] = field(default=(), compare=False)


RUNS: List[Run] = [
    Run("fast_at_8", "fast_at", 8, "cifar10_fast_at_8.yaml", groups=("table1",)),
    Run("fast_bat_8", "fast_bat", 8, "cifar10_fast_bat_8.yaml", groups=("table1",)),
    Run("fast_at_16", "fast_at", 16, "cifar10_fast_at_16.yaml", groups=("table1",)),
    Run("fast_bat_16", "fast_bat", 16, "cifar10_fast_bat_16.yaml", ("method.lam=10",), groups=("table1", "ig_ablation")),
    Run("fast_bat_16_lam_exact", "fast_bat", 16, "cifar10_fast_bat_16.yaml", ("method.lam=null",), groups=("ig_ablation",)),
    Run("fast_bat_16_lam_inf", "fast_bat", 16, "cifar10_fast_bat_16.yaml", ("method.lam=.inf",), groups=("ig_ablation",)),
]


def missing_configs(runs: Sequence[Run] = RUNS, config_dir: Path = CONFIG_DIR) -> List[str]:
    """Config files the runs need that do not exist (yet)."""
    return sorted({r.config for r in runs if not (config_dir / r.config).is_file()})


# ----------------------------------------------------------------------------------------------------------
# Tiny mode: a small image-folder archive cut out of the CIFAR-10 tarball
# ----------------------------------------------------------------------------------------------------------

def make_tiny_archive(source: Path, dest: Path, train_per_class: int = 10, test_per_class: int = 4) -> Path:
    """Copy the first ``train_per_class`` / ``test_per_class`` images of every class of an image-folder
    archive (``train/<class>/*``, ``test/<class>/*``) into a new uncompressed tar ``dest``."""
    want = {"train": train_per_class, "test": test_per_class}
    counts: Dict[Tuple[str, str], int] = {}
    classes: set = set()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source, "r:*") as src, tarfile.open(dest, "w") as out:
        for member in src:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in want:
                continue
            split, cls = parts[0], parts[1]
            classes.add(cls)
            if counts.get((split, cls), 0) >= want[split]:
                if len(classes) >= 10 and all(counts.get((s, c), 0) >= want[s] for s in want for c in classes):
                    break
                continue
            handle = src.extractfile(member)
            if handle is None:
                continue
            out.addfile(member, handle)
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
    if not counts:
        raise ValueError(f"make_tiny_archive: no train/<class>/<image> files in {source}")
    return dest


TINY_OVERRIDES = (
    "model.name=small_cnn", "model.options={width: 4, hidden: 16}", "data.n_val=20", "train.epochs=1",
    "train.batch_size=40", "eval.val_n=20", "eval.val_steps=2", "eval.test_n=20", "eval.test_steps=3",
    "eval.test_restarts=1", "device=cpu", "train.amp=none", "train.compile=false", "train.channels_last=false",
)
TINY_AA_N = 20
TINY_AA_ATTACKS = ["apgd-ce"]


# ----------------------------------------------------------------------------------------------------------
# One run: train (subprocess), then AutoAttack on best and last
# ----------------------------------------------------------------------------------------------------------

def train_run(run: Run, seed: int, data: Path, out_dir: Path, device: str, test_n: Optional[int], tiny: bool,
              extra: Sequence[str], log_dir: Path, config_dir: Path = CONFIG_DIR) -> Dict[str, Any]:
    name = f"{run.key}_seed{seed}"
    overrides = [f"data.path={data}", f"seed={seed}", f"output.dir={out_dir}", f"output.name={name}",
                 "output.overwrite=true", *run.overrides]
    if tiny:
        overrides += list(TINY_OVERRIDES)
    else:
        overrides += ["eval.test_steps=50", "eval.test_restarts=10", f"eval.test_n={'null' if test_n is None else test_n}",
                      f"device={device}"]
    overrides += list(extra)
    cmd = [sys.executable, "-m", "applications.adversarial.train", "--config", str(config_dir / run.config),
           "--no-progress", *overrides]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    env = dict(os.environ)
    if tiny:
        env["OMP_NUM_THREADS"] = "1"  # tiny tensors: threads only add contention on a shared CPU
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    wall = time.perf_counter() - t0
    run_dir = out_dir / name
    record: Dict[str, Any] = {"run": run.key, "seed": seed, "command": cmd, "log": str(log_path), "exit_code": proc.returncode,
                              "wall_time_s": wall, "run_dir": str(run_dir)}
    results_path = run_dir / "results.json"
    if proc.returncode != 0 or not results_path.is_file():
        record["error"] = f"train.py exited with {proc.returncode}; see {log_path}"
        return record
    res = json.loads(results_path.read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epoch_times = [h["epoch_time_s"] for h in history if h.get("epoch_time_s") is not None]
    record.update({
        "epochs": res.get("epochs_completed"), "best_epoch": res.get("best_epoch"),
        "s_per_epoch": statistics.mean(epoch_times) if epoch_times else None,
        "train_time_s": res.get("train_time_s"), "test_attack": res.get("test_attack"),
        "catastrophic_overfitting": res.get("catastrophic_overfitting"),
    })
    for which in ("best", "last"):
        t = res.get("test", {}).get(which)
        if t is not None:
            record[which] = {"epoch": t.get("epoch"), "n": t.get("n"), "SA": 100 * t["clean_acc"],
                             "RA-PGD": 100 * t["robust_acc"]}
    return record


def autoattack_checkpoint(checkpoint: Path, n: int, batch_size: int, device: str,
                          attacks: Optional[List[str]]) -> Dict[str, Any]:
    """AutoAttack accuracy of a training checkpoint on its dataset's first ``n`` test images."""
    import torch

    from applications.adversarial.build import build_run_model, load_run_data
    from applications.adversarial.config import config_from_dict
    from applications.adversarial.evaluation import autoattack_accuracy
    from applications.common.checkpoint import load

    ckpt = load(checkpoint, map_location=device)
    cfg = config_from_dict(ckpt["config"])
    model = build_run_model(cfg, ckpt["data_info"]).to(device)
    model.load_state_dict(ckpt["model"])
    test = load_run_data(cfg, torch.device(device), need_train=False).test
    x, y = test.x[:n], test.y[:n]
    r = autoattack_accuracy(model, x, y, cfg.eps, version=attacks or "standard", batch_size=batch_size, device=device)
    return {"n": r["n"], "SA": 100 * r["clean_acc"], "RA-AA": 100 * r["robust_acc"],
            "version": "standard" if not attacks else "custom:" + ",".join(attacks)}


def autoattack_run(record: Dict[str, Any], n: int, batch_size: int, device: str, attacks: Optional[List[str]]) -> None:
    """Add RA-AA to the best and last entries of a run's record (errors are recorded, not raised)."""
    for which in ("best", "last"):
        ckpt = Path(record["run_dir"]) / f"{which}.pt"
        if which not in record or not ckpt.is_file():
            continue
        if which == "last" and "best" in record and record["best"].get("epoch") == record["last"].get("epoch") \
                and "RA-AA" in record["best"]:
            # the best checkpoint is the last one: same weights, same AutoAttack result
            record["last"].update({k: v for k, v in record["best"].items() if k.startswith("aa_") or k == "RA-AA"})
            continue
        t0 = time.perf_counter()
        try:
            aa = autoattack_checkpoint(ckpt, n, batch_size, device, attacks)
        except Exception as exc:  # noqa: BLE001 - one failed evaluation must not lose the other runs
            record[which].update({"RA-AA": None, "aa_error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        record[which].update({"RA-AA": aa["RA-AA"], "aa_n": aa["n"], "aa_version": aa["version"],
                              "aa_time_s": time.perf_counter() - t0})


# ----------------------------------------------------------------------------------------------------------
# Aggregation and the markdown table
# ----------------------------------------------------------------------------------------------------------

def _mean_std(values: List[Optional[float]]) -> Optional[str]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def summarize(runs: Sequence[Run], records: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], str]:
    rows, table = [], []
    for run in runs:
        recs = [r for r in records if r["run"] == run.key and "error" not in r]
        row: Dict[str, Any] = {"run": run.key, "method": run.method, "eps": f"{run.eps255}/255",
                               "overrides": list(run.overrides), "groups": list(run.groups), "seeds": len(recs),
                               "s_per_epoch": _mean_std([r.get("s_per_epoch") for r in recs]),
                               "train_time_s": _mean_std([r.get("train_time_s") for r in recs])}
        for which in ("best", "last"):
            for metric in ("SA", "RA-PGD", "RA-AA"):
                row[f"{metric} ({which})"] = _mean_std([r.get(which, {}).get(metric) for r in recs])
        paper = PAPER.get((run.method, run.eps255)) if "table1" in run.groups else None
        row["paper"] = paper
        rows.append(row)
        table.append([run.key, " ".join(run.overrides) or "-", row["seeds"], row["s_per_epoch"], row["train_time_s"],
                      row["SA (best)"], row["RA-PGD (best)"], row["RA-AA (best)"], row["SA (last)"], row["RA-PGD (last)"],
                      row["RA-AA (last)"],
                      "-" if paper is None else f"{paper['SA']} / {paper['RA-PGD']} / {paper['RA-AA']} / {paper['s/epoch']}"])
    md = markdown_table(["run", "overrides", "seeds", "s/epoch", "train s", "SA best", "RA-PGD best", "RA-AA best",
                         "SA last", "RA-PGD last", "RA-AA last", "paper SA / PGD / AA / s/epoch (P100)"], table)
    return rows, md


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 (JPEG tarball or any loader path)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seeds", default="0", help="comma list of seeds (the paper: 10 runs)")
    ap.add_argument("--runs", default=None, help=f"comma list of run keys (default: all): {[r.key for r in RUNS]}")
    ap.add_argument("--test-n", type=int, default=None, help="test images for PGD-50-10 (default: all 10,000)")
    ap.add_argument("--aa-n", type=int, default=1000, help="test images for AutoAttack (0: skip AutoAttack)")
    ap.add_argument("--aa-batch", type=int, default=500)
    ap.add_argument("--aa-attacks", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, default=None, help="run directories (default: runs/table1_<device>)")
    ap.add_argument("--results", type=Path, default=None, help="default: results/table1_<device>.json (+ .md)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode (see the module docstring)")
    ap.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="where the run configs are")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args(argv)
    attacks = args.aa_attacks.split(",") if args.aa_attacks else None

    runs = RUNS if not args.runs else [r for r in RUNS if r.key in args.runs.split(",")]
    if not runs:
        raise SystemExit(f"reproduce_table1: no run matches {args.runs!r}; valid: {[r.key for r in RUNS]}")
    missing = missing_configs(runs, args.config_dir)
    if missing:
        raise SystemExit(f"reproduce_table1: missing configs in {args.config_dir}: {', '.join(missing)}")
    if not TRAIN_PY.is_file():
        raise SystemExit(f"reproduce_table1: {TRAIN_PY} does not exist")
    if not args.data.exists():
        raise SystemExit(f"reproduce_table1: CIFAR-10 not found at {args.data} (pass --data)")
    device = "cpu" if args.tiny else args.device
    tag = "tiny" if args.tiny else device.split(":")[0]
    out_dir = args.out_dir or REPO / "runs" / f"table1_{tag}"
    results_path = args.results or RESULTS_DIR / f"table1_{tag}.json"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    with tempfile.TemporaryDirectory(prefix="table1_") as tmp:
        data = args.data
        if args.tiny:
            import torch

            torch.set_num_threads(1)
            data = make_tiny_archive(args.data, Path(tmp) / "cifar10-tiny.tar")
            attacks = attacks or TINY_AA_ATTACKS
        unique: Dict[Tuple[str, Tuple[str, ...]], Run] = {}
        for run in runs:
            unique.setdefault((run.config, run.overrides), run)
        records: List[Dict[str, Any]] = []
        for run in unique.values():
            for seed in seeds:
                print(f"== {run.key} seed {seed}: training ...", flush=True)
                rec = train_run(run, seed, data, out_dir, device, args.test_n, args.tiny, args.overrides, out_dir / "logs",
                                args.config_dir)
                if "error" not in rec and args.aa_n > 0:
                    autoattack_run(rec, min(args.aa_n, TINY_AA_N) if args.tiny else args.aa_n, args.aa_batch, device, attacks)
                print(f"   {json.dumps({k: rec.get(k) for k in ('exit_code', 's_per_epoch', 'best', 'last', 'error')})}",
                      flush=True)
                records.append(rec)
        # runs with identical settings share records
        for run in runs:
            twin = unique[(run.config, run.overrides)]
            if twin.key != run.key:
                records += [{**r, "run": run.key} for r in records if r["run"] == twin.key]

    rows, md = summarize(runs, records)
    results = {
        "benchmark": "reproduce_table1", "machine": machine_info(device), "tiny": args.tiny, "data": str(args.data),
        "seeds": seeds, "protocol": ("tiny smoke mode: numbers are meaningless" if args.tiny else
                                     "CIFAR-10 (JPEG copy), PreActResNet-18, configs as listed; PGD-50-10 step eps/4 on "
                                     f"{'all' if args.test_n is None else args.test_n} test images; standard AutoAttack on "
                                     f"the first {args.aa_n}"),
        "evaluate_py_present": EVALUATE_PY.is_file(),
        "rows": rows, "records": records,
    }
    write_json(results_path, results)
    md_path = results_path.with_suffix(".md")
    md_path.write_text(f"# Table 1 reproduction ({tag})\n\n{results['protocol']}\n\n{md}\n", encoding="utf-8")
    print("\n" + md)
    print(f"\nwrote {results_path} and {md_path}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
