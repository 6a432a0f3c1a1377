"""train.py end to end on the embedded digits: Fast-BAT is robust where standard training is not;
the run writes its files; a diverging run stops with exit code 3 and keeps its last good checkpoint."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "applications" / "adversarial" / "train.py"

# 1,237 train / 200 val / 360 test 8x8 digits, 19 steps per epoch, 15 epochs = 285 steps.
TINY = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "n_val": 200},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "train": {"epochs": 15, "batch_size": 64, "lr_max": 0.2},
    "eval": {"eps": 0.2, "val_n": 200, "test_n": 360, "test_steps": 20, "test_restarts": 1},
}


def run_train(tmp_path: Path, name: str, method: dict, *overrides: str, timeout: int = 300):
    cfg = dict(TINY, method=method, output={"dir": str(tmp_path), "name": name})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(path), *overrides], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc, tmp_path / name


@pytest.mark.slow
def test_fast_bat_is_robust_and_standard_is_not(tmp_path):
    proc_bat, bat = run_train(tmp_path, "bat", {"name": "fast_bat", "eps": 0.2})
    assert proc_bat.returncode == 0, proc_bat.stderr[-3000:]
    proc_std, std = run_train(tmp_path, "std", {"name": "standard"})
    assert proc_std.returncode == 0, proc_std.stderr[-3000:]
    r_bat = json.loads((bat / "results.json").read_text())
    r_std = json.loads((std / "results.json").read_text())
    for name, r in (("fast_bat", r_bat), ("standard", r_std)):
        print(name, {k: (v["clean_acc"], v["robust_acc"]) for k, v in r["test"].items()})
    # same 360 test images, PGD-20 at eps 0.2 (measured: Fast-BAT clean ~0.96 / robust ~0.6; standard ~0.98 / ~0.05)
    for r in (r_bat, r_std):
        assert r["test"]["best"]["n"] == 360 and r["test"]["last"]["n"] == 360
        assert r["epochs_completed"] == 15 and r["steps"] == 15 * 19
    assert r_std["test"]["last"]["clean_acc"] >= 0.9
    assert r_bat["test"]["best"]["clean_acc"] >= 0.85
    assert r_bat["test"]["best"]["robust_acc"] >= 0.40
    assert r_std["test"]["best"]["robust_acc"] <= 0.20
    assert r_bat["test"]["best"]["robust_acc"] - r_std["test"]["best"]["robust_acc"] >= 0.25

    # files: checkpoints (weights-only loadable), metrics, plot, config
    for name in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv", "plot.png", "config.yaml", "results.json"):
        assert (bat / name).is_file(), name
    last = torch.load(bat / "last.pt", weights_only=True)
    best = torch.load(bat / "best.pt", weights_only=True)
    assert last["epoch"] == 15 and last["step"] == 285 and last["kind"] == "last"
    assert best["epoch"] == r_bat["best_epoch"] and best["val_robust_acc"] == pytest.approx(r_bat["best_val_robust_acc"])
    assert set(last) >= {"model", "optimizer", "rng", "co", "config", "history", "best_val_robust_acc"}
    records = [json.loads(line) for line in (bat / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 16))
    assert all(0 <= r["val_robust_acc"] <= 1 and math.isfinite(r["train_loss"]) for r in records)
    assert max(r["val_robust_acc"] for r in records) == pytest.approx(r_bat["best_val_robust_acc"])
    csv_lines = (bat / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss") and len(csv_lines) == 16
    assert (bat / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test (PGD-20-1" in proc_bat.stdout + proc_bat.stderr


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 trains at lr 0.05; from epoch 2 on the lr is 0.05 * 1e9
    proc, run = run_train(tmp_path, "nan", {"name": "standard"}, "train.epochs=3", "train.lr_schedule=piecewise",
                          "train.lr_max=0.05", "train.lr_milestones=[1]", "train.lr_gamma=1e9",
                          "train.nan_check_every=4", "eval.val_n=20", "eval.test_n=20")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    msg = proc.stderr
    assert "training diverged: non-finite loss at epoch 2, step " in msg, msg
    step = int(msg.split("at epoch 2, step ")[1].split()[0])
    assert 1 < step <= 4  # found within nan_check_every steps, named exactly
    assert f"(global step {19 + step})" in msg
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 19
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (run / "results.json").exists()


def test_catastrophic_overfitting_is_reported_and_stops_training(tmp_path):
    # detector options that call every epoch after the first a collapse: robust <= 0.99 counts as
    # collapsed once any robustness (>= 0) was seen and clean accuracy held at >= 0 x its best
    co = {"enabled": True, "early_stop": True, "min_robust_acc": 0.99, "min_best_robust_acc": 0.0,
          "clean_ratio": 0.0, "patience": 1}
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    proc, run = run_train(tmp_path, "co", {"name": "fast_at", "eps": 0.2}, "train.epochs=4", "eval.val_n=40",
                          "eval.test_n=40", "eval.test_steps=5", f"co={json.dumps(co)}",
                          f"output.tensorboard={str(has_tensorboard).lower()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["catastrophic_overfitting"]["detected"] and results["catastrophic_overfitting"]["epoch"] == 2
    assert results["stopped_early"] and results["epochs_completed"] == 2
    log = (run / "train.log").read_text()
    assert "WARNING: catastrophic overfitting at epoch 2" in log and "co.early_stop: stopping training" in log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["co_collapsed"] for r in records] == [False, True]
    if has_tensorboard:  # the TensorBoard scalars are the metrics' numbers
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        robust = {e.step: e.value for e in events.Scalars("val/robust_accuracy")}
        assert robust == pytest.approx({r["epoch"]: r["val_robust_acc"] for r in records}, rel=1e-6)
