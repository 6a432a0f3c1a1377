"""Tiny training runs for the tests of the failure paths: the train command in this process, or in a
child process with one injected fault (see ``_faults.py``).

The run: the embedded 8x8 digits (1,237 train / 200 val / 360 test), a width-8 CNN, batch 64 (19 steps
per epoch), a 3-step PGD on 50 validation images; about half a second per epoch on one core.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
FAULTS = Path(__file__).resolve().parent / "_faults.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

TINY: Dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "n_val": 200},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "method": {"name": "standard"},
    "train": {"epochs": 2, "batch_size": 64, "lr_max": 0.2},
    "eval": {"eps": 0.2, "val_n": 50, "val_steps": 3, "test_n": 50, "test_steps": 3, "test_restarts": 1},
}


class Outcome(NamedTuple):
    """Exit status and captured output of one command."""

    rc: int
    out: str
    err: str


def write_config(tmp: Path, name: str, **sections: Any) -> Path:
    """``tmp/<name>.yaml``: :data:`TINY` with ``sections`` replacing whole sections, run dir ``tmp/<name>``."""
    cfg = copy.deepcopy(TINY)
    cfg.update(sections)
    cfg["output"] = {"dir": str(tmp), "name": name, **sections.get("output", {})}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(capsys: Any, *args: str) -> Outcome:
    """The train command (``--no-progress``) in this process."""
    from applications.adversarial.train import main

    rc = main(["--no-progress", *[str(a) for a in args]])
    captured = capsys.readouterr()
    return Outcome(rc, captured.out, captured.err)


def train_child(*args: str, fault: str = "", timeout: int = 300) -> Outcome:
    """The train command in a child process, with the fault ``kind:count:when`` of ``_faults.py`` (if any)."""
    proc = subprocess.run([sys.executable, str(FAULTS), fault, "--no-progress", *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def load(path: Path) -> Dict[str, Any]:
    """A checkpoint, weights-only."""
    return torch.load(path, weights_only=True)


def metrics(run: Path) -> List[Dict[str, Any]]:
    """metrics.jsonl without the timing columns."""
    import json

    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]
