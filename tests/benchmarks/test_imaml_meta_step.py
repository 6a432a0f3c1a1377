"""benchmarks/imaml_meta_step.py at tiny size: it writes its JSON and markdown with the expected keys.

Where Betty is importable, its one-iteration CG meta-gradient must equal ours with ``CG(maxiter=1)`` (the first
CG iterate is the same in both; Betty divides each task's loss by ``gradient_accumulation``, a mean over tasks as
ours): the benchmark's explanation of the Betty comparison rests on this. Without Betty its rows are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "meta_step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/imaml_meta_step.py", "--tiny", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"config", "betty", "timing", "gradient_check", "learning", "machine", "loadavg_start", "loadavg_end",
            "wall_s"} <= set(data)
    assert data["machine"]["cpu_model"] and data["machine"]["torch_threads"] == 1
    assert [r["meta_batch"] for r in data["timing"]] == [2, 4]
    for r in data["timing"]:
        assert r["vmap_s"] > 0 and r["loop_s"] > 0 and abs(r["speedup"] - r["loop_s"] / r["vmap_s"]) < 1e-9
        assert ("betty_s" in r) == data["betty"]
    grads = {r["method"]: r for r in data["gradient_check"]}
    assert {"bilevel CG(1)", "first-order MAML"} <= set(grads)
    for r in grads.values():
        assert -1.0 - 1e-9 <= r["cosine"] <= 1.0 + 1e-9 and r["norm_ratio"] > 0
    learning = {r["method"]: r for r in data["learning"]}
    assert "random init" in learning and all(r["mse_10"] > 0 for r in learning.values())
    if data["betty"]:
        betty1, ours1 = grads["Betty cg_iterations=1"], grads["bilevel CG(1)"]
        assert abs(betty1["cosine"] - ours1["cosine"]) < 1e-4 and abs(betty1["norm_ratio"] / ours1["norm_ratio"] - 1) < 1e-4
        assert any(name.startswith("Betty iMAML") for name in learning)
    else:
        assert not any("Betty" in name for name in list(grads) + list(learning))
    md = out.with_suffix(".md").read_text()
    assert "loop / vmap" in md and "cosine to exact" in md
