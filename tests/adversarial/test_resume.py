"""A run killed with SIGKILL after its first checkpoint and resumed with --resume ends bit-identical
to an uninterrupted run (CPU, same seed, same thread count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "applications" / "adversarial" / "train.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

# Fast-BAT (random starts: exercises the RNG state) with flip + crop augmentation (per-epoch data
# generator), MNIST 1,000 train images, 10 steps per epoch, 4 epochs.
CONFIG = {
    "seed": 3, "device": "cpu",
    "data": {"name": "mnist5k", "n_val": 100, "n_train": 1000, "augmentation": {"crop": 2, "flip": True}},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "method": {"name": "fast_bat", "eps": 0.3},
    "train": {"epochs": 4, "batch_size": 100, "lr_max": 0.1},
    "eval": {"val_n": 50, "val_steps": 3, "final_test": False},
}


def write_config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(CONFIG, output={"dir": str(tmp), "name": name})))
    return path


def train_cmd(*args: str):
    return [sys.executable, str(TRAIN), "--no-progress", *args]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    # the interrupted run: killed as soon as its first last.pt exists (it is then in epoch 2)
    proc = subprocess.Popen(train_cmd("--config", str(write_config(tmp_path, "killed"))), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()
    killed_at = torch.load(last, weights_only=True)
    assert 1 <= killed_at["epoch"] < 4, "the run must be killed before it finished"

    # the reference run, uninterrupted (runs while nothing else of this test does)
    ref = subprocess.run(train_cmd("--config", str(write_config(tmp_path, "ref"))), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    resumed = subprocess.run(train_cmd("--resume", str(tmp_path / "killed")), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}: {killed_at['epoch']} epoch(s)" in resumed.stdout

    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"] == 40
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # bit-exact weights
    for (ka, sa), (kb, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert ka == kb and torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["best_epoch"] == b["best_epoch"] and a["best_val_robust_acc"] == b["best_val_robust_acc"]

    # metrics: one line per epoch, the same numbers as the uninterrupted run (times aside)
    def metrics(run: str):
        rows = [json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]

    assert [r["epoch"] for r in metrics("killed")] == [1, 2, 3, 4]
    assert metrics("killed") == metrics("ref")
    assert len((tmp_path / "killed" / "metrics.csv").read_text().splitlines()) == 5


def test_resume_refuses_another_model_and_a_missing_run(tmp_path):
    cfg = write_config(tmp_path, "short")
    done = subprocess.run(train_cmd("--config", str(cfg), "train.epochs=1", "data.n_train=200"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "short"
    bad = subprocess.run(train_cmd("--resume", str(run), "model.options.width=16", "method.eps=0.1"), env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "checkpoint is incompatible" in bad.stderr and "model.options.width: saved=8 new=16" in bad.stderr
    assert "method.eps: saved=0.3 new=0.1" in bad.stderr
    missing = subprocess.run(train_cmd("--resume", str(tmp_path / "nothing")), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "cannot resume" in missing.stderr
    # starting a fresh run over an existing one is refused too
    again = subprocess.run(train_cmd("--config", str(cfg)), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr
    # extending a finished run: more epochs are allowed (training keys may change)
    more = subprocess.run(train_cmd("--resume", str(run), "train.epochs=2", "data.n_train=200"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
