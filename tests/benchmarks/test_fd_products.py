"""Smoke test of benchmarks/fd_products.py: a tiny run in a subprocess writes its JSON with sane numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fd_products_tiny(tmp_path):
    out = tmp_path / "fd.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "benchmarks/fd_products.py", "--tiny", "--repeats", "2", "--warmup", "1",
                          "--out", str(out)], capture_output=True, text=True, cwd=str(REPO), timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["precision"], r["lam"], r["variant"]): r for r in data["accuracy"]}
    for lam in (10.0, "1/step"):
        assert rows[("float64", lam, "exact")]["ig_rel_err_vs_exact_same_precision"] == 0
        # the tiny ReLU CNN is differenced without crossing a kink in float64 (the full-size models do cross)
        assert rows[("float64", lam, "central")]["ig_rel_err_vs_exact_same_precision"] < 1e-6
        assert rows[("float64", lam, "forward")]["ig_rel_err_vs_exact_same_precision"] < 1e-5
        assert rows[("float32", lam, "exact")]["ig_rel_err_vs_exact_float64"] < 1e-4
    sweep = [r for r in data["step_sweep"] if r["precision"] == "float64" and r["variant"] == "central"]
    assert [r["scale"] for r in sweep] == [0.01, 0.1, 1.0, 10.0, 100.0]
    methods = {r["method"] for r in data["timing"]}
    assert methods >= {"fast_at", "fast_bat no IG", "fast_bat IG exact", "fast_bat IG central", "fast_bat IG forward"}
    assert all(r["median_ms"] > 0 for r in data["timing"])
