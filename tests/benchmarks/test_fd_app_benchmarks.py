"""Smoke tests of benchmarks/fd_step_rules.py (a tiny run) and benchmarks/fd_training.py (summary statistics)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import fd_training  # noqa: E402


def test_fd_step_rules_tiny(tmp_path):
    out = tmp_path / "rules.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "benchmarks/fd_step_rules.py", "--tiny", "--out", str(out)],
                         capture_output=True, text=True, cwd=str(REPO), timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by = {(r["precision"], r["variant"], r["rule"], r["scale"]): r for r in rows}
    assert by[("float64", "exact", "-", None)]["rel_err_vs_exact_float64"] == 0
    # no kink crossed at small steps in float64: the differences are the exact product to their error model
    for rule in ("batch", "per_sample"):
        small = by[("float64", "central", rule, 1e-3)]
        assert small["relu_crossed_fraction"] == 0 and small["rel_err_vs_exact_float64"] < 1e-4
    assert len(rows) == 2 * (1 + 2 * 2 * 7)


def _fake_run(root: Path, products: str, seed: int, clean: float, robust: float) -> None:
    run = root / fd_training.run_name(products, seed)
    run.mkdir(parents=True)
    test = {ck: {"clean_acc": clean, "robust_acc": robust, "epoch": 10, "n": 500} for ck in ("best", "last")}
    (run / "results.json").write_text(json.dumps({"epochs_completed": 10, "train_time_s": 100.0 + seed,
                                                  "test_attack": "PGD-50-1", "test": test}))


def test_fd_training_summary(tmp_path):
    for seed, (c, r) in enumerate([(0.97, 0.41), (0.96, 0.31), (0.98, 0.27)]):
        _fake_run(tmp_path, "exact", seed, c, r)
    _fake_run(tmp_path, "forward", 0, 0.95, 0.28)
    out = fd_training.summarize(tmp_path, ["exact", "forward"], [0, 1, 2])
    assert len(out["runs"]) == 4
    robust = out["summary"]["exact"]["last_robust_acc"]
    assert robust["mean"] == pytest.approx(statistics.fmean([0.41, 0.31, 0.27]))
    assert robust["std"] == pytest.approx(statistics.stdev([0.41, 0.31, 0.27]))
    assert (robust["min"], robust["max"], robust["n"]) == (0.27, 0.41, 3)
    assert out["summary"]["forward"]["best_clean_acc"] == {"mean": 0.95, "std": 0.0, "min": 0.95, "max": 0.95, "n": 1}
