"""Fault injection: a tiny run killed (SIGKILL) again and again, at random instants and in the middle
of checkpoint writes, then continued each time (``--resume`` when a ``last.pt`` exists, else started
again), ends exactly where an uninterrupted run ends: weights, optimizer, metrics, best checkpoint and
final test numbers (CPU, one thread, same seed)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from _tiny_run import ENV, FAULTS, load, metrics, train_child, write_config

# Fast-AT (random starts: the RNG state) with flip and crop (the per-epoch data stream), 5 epochs of 19 steps
SECTIONS = {"method": {"name": "fast_at", "eps": 0.2}, "data": {"name": "digits", "n_val": 200,
                                                                   "augmentation": {"flip": True, "crop": 1}},
            "train": {"epochs": 5, "batch_size": 64, "lr_max": 0.2}}


def kill_at_random(args, run, rng):
    """Starts the command and SIGKILLs it at a random instant once its first epoch has been logged."""
    proc = subprocess.Popen([sys.executable, str(FAULTS), "", "--no-progress", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "train.log"

    def epochs_logged() -> int:  # train.log is appended to by every process of the run
        return log.read_text().count("\nepoch ") if log.is_file() else 0

    before = epochs_logged()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if epochs_logged() > before:
            time.sleep(rng.uniform(0.0, 1.0))
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=60)
    proc.stderr.close()
    return rc


@pytest.mark.slow
def test_killed_many_times_the_run_ends_like_an_uninterrupted_one(tmp_path):
    ref_cfg = write_config(tmp_path, "ref", **SECTIONS)
    ref = train_child("--config", ref_cfg)
    assert ref.rc == 0, ref.err[-3000:]
    cfg = write_config(tmp_path, "run", **SECTIONS)
    run = tmp_path / "run"
    rng = random.Random(12)
    # inside the first write of last.pt; inside the first best.pt (epoch 1 is always a best epoch); between
    # last.pt and best.pt; inside a later last.pt; at random instants (mid-epoch, mid-validation, ...)
    faults = ["last:1:mid", "best:1:mid", "random", "last:1:after", "random", "last:1:mid", "random"]
    kills = 0
    for fault in faults:
        args = ["--resume", str(run)] if (run / "last.pt").is_file() else ["--config", str(cfg)]
        if fault == "random":
            rc = kill_at_random(args, run, rng)
        else:
            rc = train_child(*args, fault=fault).rc
        assert rc in (0, -signal.SIGKILL), (fault, rc)
        kills += rc == -signal.SIGKILL
        if rc == 0:
            break
    assert kills >= 4, kills
    if not (run / "results.json").is_file():
        done = train_child("--resume", str(run))
        assert done.rc == 0, done.err[-3000:]

    a, b = load(tmp_path / "ref" / "last.pt"), load(run / "last.pt")
    assert a["epoch"] == b["epoch"] == 5 and a["step"] == b["step"] == 95
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for (_, sa), (_, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    best_a, best_b = load(tmp_path / "ref" / "best.pt"), load(run / "best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    assert all(torch.equal(v, best_b["model"][k]) for k, v in best_a["model"].items())
    assert metrics(run) == metrics(tmp_path / "ref")
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (tmp_path / "ref", run))
    assert rb["best_epoch"] == ra["best_epoch"]
    for name in ("best", "last"):
        assert {k: v for k, v in rb["test"][name].items() if k != "time_s"} == \
               {k: v for k, v in ra["test"][name].items() if k != "time_s"}
    assert not list(run.glob(".*.tmp"))
