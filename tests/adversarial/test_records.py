"""The run's records: metrics files agree with the history; TensorBoard events read back hold the values."""

from __future__ import annotations

import csv
import json

import pytest

from applications.adversarial.records import METRIC_FIELDS, TensorBoardScalars
from applications.common.atomic import write_json, write_metrics


def record(epoch: int, **values):
    base = {k: None for k in METRIC_FIELDS}
    return {**base, "epoch": epoch, "step": 10 * epoch, "lr": 0.1 / epoch, "train_loss": 1.0 / epoch,
            "train_acc": 0.5 + 0.1 * epoch, "val_clean_acc": 0.6, "val_robust_acc": 0.3 + 0.01 * epoch,
            "train_attack_acc": 0.8, "train_pgd_acc": 0.2, "epoch_time_s": 2.0, "eval_time_s": 0.5, **values}


def test_metrics_files_hold_the_history(tmp_path):
    history = [record(1), record(2, val_robust_acc=None, extra_key="kept in jsonl")]
    write_metrics(tmp_path, history, METRIC_FIELDS)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert list(rows[0]) == list(METRIC_FIELDS)
    assert float(rows[0]["val_robust_acc"]) == pytest.approx(0.31) and rows[1]["val_robust_acc"] == ""
    write_json(tmp_path / "results.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl", "results.json"]


def read_scalars(log_dir):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_read_back_and_resume_purges(tmp_path):
    pytest.importorskip("tensorboard")
    writer = TensorBoardScalars(tmp_path)
    for epoch in (1, 2, 3):
        writer.add(record(epoch, val_robust_acc=None if epoch == 2 else 0.3 + 0.01 * epoch))
    writer.close()
    scalars = read_scalars(tmp_path)
    assert scalars["val/robust_accuracy"] == pytest.approx({1: 0.31, 3: 0.33})
    assert scalars["train/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert set(scalars) == set(TensorBoardScalars.TAGS.values()) and scalars["time/eval_s"] == {1: 0.5, 2: 0.5, 3: 0.5}
    # a run resumed after epoch 1 repeats epochs 2-3: their old events are hidden
    resumed = TensorBoardScalars(tmp_path, purge_step=2)
    resumed.add(record(2, train_loss=0.25))
    resumed.close()
    assert read_scalars(tmp_path)["train/loss"] == pytest.approx({1: 1.0, 2: 0.25})


def test_an_unwritable_tensorboard_directory_is_one_line_without_a_thread_traceback(tmp_path):
    """The writer thread of SummaryWriter used to print a 40-line traceback after the command's one-line error.
    An immutable directory (chattr +i) is unwritable even for root, where a read-only one is not."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("tensorboard")
    from _tiny_run import ENV, REPO, write_config

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available")
    cfg = write_config(tmp_path, "ro", output={"tensorboard": True})
    tb = tmp_path / "ro" / "tensorboard"
    tb.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(tb)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem does not support immutable directories")
    try:
        proc = subprocess.run([sys.executable, "-m", "applications.adversarial", "--no-progress", "--config", str(cfg)],
                              capture_output=True, text=True, cwd=str(REPO), env=ENV, timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(tb)], capture_output=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "tensorboard" in proc.stderr
