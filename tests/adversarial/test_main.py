"""The commands start from every documented entry: ``python -m applications.adversarial [train|evaluate]``
and the scripts themselves (the package is imported, never put on ``sys.path`` by the scripts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args, usage", [
    (["-m", "applications.adversarial", "--help"], "usage: bilevel-train"),
    (["-m", "applications.adversarial", "evaluate", "--help"], "usage: bilevel-evaluate"),
    ([str(REPO / "applications" / "adversarial" / "train.py"), "--help"], "usage: bilevel-train"),
])
def test_commands_start(args, usage, tmp_path):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(usage), proc.stdout[:300]


def test_main_dispatches_and_keeps_the_exit_code(tmp_path):
    from applications.adversarial.__main__ import main

    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
