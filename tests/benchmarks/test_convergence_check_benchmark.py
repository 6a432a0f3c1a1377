"""benchmarks/convergence_check.py --tiny: runs and writes the overheads it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_convergence_check_benchmark_tiny(tmp_path):
    out = tmp_path / "cc.json"
    proc = subprocess.run([sys.executable, "benchmarks/convergence_check.py", "--tiny", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["tiny"] is True and set(data["per_step_s"]) == {"none", "every_1"}
    assert data["per_step_s"]["none"]["median_s"] > 0 and "amortized_overhead" in data
    assert "ConvergenceCheck(every=1)" in proc.stdout
