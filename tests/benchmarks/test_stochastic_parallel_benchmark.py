"""benchmarks/stochastic_parallel.py --tiny: one and two gloo processes run and the table and JSON are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_stochastic_parallel_benchmark_tiny(tmp_path):
    out = tmp_path / "sp.json"
    proc = subprocess.run([sys.executable, "benchmarks/stochastic_parallel.py", "--tiny", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["world_size"] for r in data["runs"]] == [1, 2]
    for run in data["runs"]:
        assert set(run["rows"]) == {"soba", "amigo"} and all(r["iterations_per_s"] > 0 for r in run["rows"].values())
    assert 0 < data["runs"][1]["rows"]["soba"]["allreduce_share"] < 1
    assert "all-reduce share" in proc.stdout
