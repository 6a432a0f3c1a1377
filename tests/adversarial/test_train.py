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
from _tiny_run import train, write_config

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


# ------------------------------------------------------------------ bad data, I/O and device errors
# Each is one line on stderr, exit status 2, no traceback.


def one_line_error(res) -> str:
    assert res.rc == 2, res.out[-2000:] + res.err[-2000:]
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.err, res.err
    return lines[0]


def write_image_tree(root: Path, bad: str = "") -> None:
    """root/{train,test}/{a,b}/<i>.png, 8x8 grey; the file ``bad`` (relative) holds garbage bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / split / cls / f"{i:03d}.png")
    if bad:
        (root / bad).write_bytes(b"\xff\xd8\xff\xe0 this is not an image")


def write_npz(path: Path, classes: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(classes)
    np.savez(path, x_train=rng.integers(0, 256, (80, 8, 8), dtype=np.uint8), y_train=np.arange(80) % classes,
             x_test=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y_test=np.arange(20) % classes)
    return path


IMAGES = {"n_val": 4}


def test_a_corrupt_image_is_named(tmp_path, capsys):
    write_image_tree(tmp_path / "tree", bad="train/b/007.png")
    cfg = write_config(tmp_path, "run", data={"name": "image_folder", "path": str(tmp_path / "tree"), **IMAGES},
                       train={"epochs": 1, "batch_size": 8})
    line = one_line_error(train(capsys, "--config", cfg))
    assert "train/b/007.png" in line and "cannot decode" in line, line


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_garbage_archive_is_one_line(tmp_path, capsys, damage):
    import tarfile

    write_image_tree(tmp_path / "tree")
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage" * 100)
    cfg = write_config(tmp_path, "run", data={"name": "image_folder", "path": str(archive), **IMAGES},
                       train={"epochs": 1, "batch_size": 8})
    line = one_line_error(train(capsys, "--config", cfg))
    assert str(archive) in line and "truncated or corrupt" in line, line


def test_an_unusable_output_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    cfg = write_config(tmp_path, "run", output={"dir": str(tmp_path / "afile" / "runs")})
    line = one_line_error(train(capsys, "--config", cfg, "train.epochs=1"))
    assert "cannot write" in line and "afile" in line, line


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """torch.save buries ENOSPC in a RuntimeError('unexpected pos ...'); the user sees Errno 28 and the file."""
    import errno
    import io

    import torch
    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, Full(), *a, **k))
    cfg = write_config(tmp_path, "run")
    line = one_line_error(train(capsys, "--config", cfg, "train.epochs=1"))
    assert "No space left on device" in line and str(tmp_path / "run") in line and ".pt" in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    line = one_line_error(train(capsys, "--config", write_config(tmp_path, "run"), "device=cuda"))
    assert "CUDA is not available" in line and "device=cpu" in line, line
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_class_count_is_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path, "run", data={"name": "npz", "path": str(write_npz(tmp_path / "three.npz", 3)),
                                              "n_val": 10}, train={"epochs": 1, "batch_size": 10})
    assert train(capsys, "--config", cfg).rc == 0
    four = write_npz(tmp_path / "four.npz", 4)
    line = one_line_error(train(capsys, "--resume", tmp_path / "run", f"data.path={four}"))
    assert "num_classes: saved=3 new=4" in line, line
