"""torchrun --nproc_per_node 2 (gloo, CPU): same result as one process with the same global batch.

With ``train.batch_size`` the global batch, both ranks draw the same permutation and augmentation and
take the strided halves; the model is wrapped in DistributedDataParallel, whose backward averages the
gradients over ranks, and the attack passes run through the plain module. The methods' random starts
are each rank's rows of the single-process draw (``methods.ShardedGenerator``), so for a model
without BatchNorm the two-process run computes the same sums in a different order and the parameters
agree to float32 rounding. Standard training: measured max |diff| ~3e-8 after 25 steps. Fast-BAT
with the exact implicit gradient (``lam: null``, the DDP-sensitive case: the implicit term reaches
``.grad`` through the attack graph of the plain module): measured max |diff| ~4e-8 after 10 steps,
while dropping the implicit term (``lam: .inf``) moves the parameters by ~2e-4. The bound 1e-6
leaves room for the accumulated reordering.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "applications" / "adversarial" / "train.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

CONFIG = {
    "seed": 0, "device": "cpu",
    "data": {"name": "digits", "n_val": 200, "augmentation": {"flip": True, "crop": 1}},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "method": {"name": "standard"},
    "train": {"epochs": 2, "batch_size": 64, "lr_max": 0.1, "max_steps": 25},
    "eval": {"eps": 0.1, "val_n": 150, "val_steps": 3, "test_n": 151, "test_steps": 3, "test_restarts": 2,
             "batch_size": 64},
}


def launch(tmp: Path, name: str, nproc: int, *overrides: str):
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(dict(CONFIG, output={"dir": str(tmp), "name": name})))
    cmd = [str(TRAIN), "--no-progress", "--config", str(cfg), *overrides]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, tmp / name


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    proc2, run2 = launch(tmp_path, "ddp", 2)
    _, run1 = launch(tmp_path, "single", 1)
    a = torch.load(run2 / "last.pt", weights_only=True)
    b = torch.load(run1 / "last.pt", weights_only=True)
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["step"] == b["step"] == 25
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff <= 1e-6, diff
    # the train metrics are reduced over ranks: the global-batch loss and accuracy
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
        assert ra["train_acc"] == pytest.approx(rb["train_acc"], abs=1e-12)
        assert ra["val_clean_acc"] == pytest.approx(rb["val_clean_acc"], abs=1e-12)
        # the attacks' random starts do not depend on the number of processes either
        assert ra["val_robust_acc"] == rb["val_robust_acc"] and ra["is_best"] == rb["is_best"]
    assert a["best_epoch"] == b["best_epoch"]
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (run2, run1))
    for name in ("best", "last"):  # 151 test images: uneven shards, a last batch of 23
        assert ra["test"][name]["n"] == 151
        assert ra["test"][name]["robust_acc"] == rb["test"][name]["robust_acc"], (ra["test"], rb["test"])
    assert 0.05 < rb["test"]["last"]["robust_acc"] < 0.95  # not vacuous: the random starts matter
    # only rank 0 writes and logs
    out = proc2.stdout + proc2.stderr
    assert out.count("epoch   1/2") == 1 and out.count("results: ") == 1
    log = (run2 / "train.log").read_text()
    assert log.count("epoch   1/2") == 1 and "2 process(es)" in log
    assert "Warning" not in proc2.stderr, proc2.stderr[-2000:]


_FAST_BAT = ("method={name: fast_bat, eps: 0.1, attack_step: 0.05, lam: null}", "train.max_steps=10",
             "train.epochs=1", "eval.val_n=0", "eval.test_n=20")


@pytest.mark.slow
def test_fast_bat_two_processes_match_one(tmp_path):
    """The exact implicit gradient under DDP: same parameters as one process; the odd global batch is refused."""
    _, run2 = launch(tmp_path, "bat2", 2, *_FAST_BAT)
    _, run1 = launch(tmp_path, "bat1", 1, *_FAST_BAT)
    _, run_fo = launch(tmp_path, "bat_fo", 1, *_FAST_BAT, "method.lam=.inf")
    a, b, fo = (torch.load(r / "last.pt", weights_only=True) for r in (run2, run1, run_fo))
    assert a["step"] == b["step"] == 10 and len(a["rng"]) == 2
    assert all(torch.isfinite(v).all() for v in a["model"].values())
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff <= 1e-6, diff
    # not vacuous: the implicit term moves the parameters by far more than the tolerance
    implicit = max((fo["model"][k] - b["model"][k]).abs().max().item() for k in b["model"])
    assert implicit > 2e-5, implicit
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], abs=1e-6)
    cfg = tmp_path / "odd.yaml"
    cfg.write_text(yaml.safe_dump(dict(CONFIG, output={"dir": str(tmp_path), "name": "odd"})))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(TRAIN), "--config", str(cfg), "train.batch_size=63"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    assert "train.batch_size=63 (the global batch) must be divisible by the number of processes 2" in proc.stderr


def _our_lines(stderr: str):
    """The command's own messages, without torchrun's report and the warnings."""
    return [line for line in stderr.splitlines() if line.startswith(("error", "interrupted by", "  - "))]


@pytest.mark.slow
def test_an_error_is_one_line_and_every_rank_exits_with_its_status(tmp_path):
    """A run directory that is a file (rank 0 alone takes it), a global batch the processes cannot split (every
    rank), and a corrupt dataset file (every rank reads it): one error line each, not one per rank, and
    torchrun's report has rank 0 first with the command's exit status 2."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(CONFIG, output={"dir": str(tmp_path), "name": "file"})))
    (tmp_path / "file").write_text("")
    (tmp_path / "corrupt.npz").write_bytes(b"not an npz file")
    cases = {
        (): [f"error: run directory {tmp_path / 'file'} is a file; choose another output.dir / output.name"],
        ("output.name=odd", "train.batch_size=63"): [
            "error: invalid configuration (1 problem):",
            "  - train.batch_size=63 (the global batch) must be divisible by the number of processes 2"],
        ("output.name=nodata", "data.name=npz", f"data.path={tmp_path / 'corrupt.npz'}"): None,
    }
    for overrides, expected in cases.items():
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN), "--no-progress",
               "--config", str(cfg), *overrides]
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300, env=ENV)
        lines = _our_lines(proc.stderr)
        if expected is None:  # the data error names the unreadable file, once
            assert len(lines) == 1 and "corrupt.npz" in lines[0], proc.stderr[-3000:]
        else:
            assert lines == expected, proc.stderr[-3000:]
        assert proc.returncode != 0 and f'File "{REPO / "applications"}' not in proc.stderr  # no traceback of ours
        root = proc.stderr.split("Root Cause")[1]
        assert "rank      : 0" in root and "exitcode  : 2 " in root, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_with_one_line_and_the_resume_ends_like_the_uninterrupted_run(tmp_path):
    """Rank 1 SIGKILLed as epoch 2 ends (epoch 1's checkpoint was written with both alive; rank 0 then finds its
    peer gone, or torchrun stops it):
    one line from the surviving process, saying how to resume; resuming on two processes ends with the
    parameters of the uninterrupted two-process run."""
    faults = Path(__file__).resolve().parent / "_faults.py"
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(yaml.safe_dump(dict(CONFIG, output={"dir": str(tmp_path), "name": "kill"})))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(faults), "",
           "--no-progress", "--config", str(cfg)]
    # its 4th action of rank 0: the run-directory check, its opening, epoch 1's write, then epoch 2's
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**ENV, "BL_KILL_RANK": "1", "BL_KILL_AT": "4"})
    lines = _our_lines(killed.stderr)  # the lost connection, or SIGTERM from torchrun if that came first
    assert killed.returncode != 0 and len(lines) == 1, killed.stderr[-3000:]
    assert lines[0].startswith(("error: another process of the run stopped", "interrupted by SIGTERM"))
    assert f"resume with: bilevel-train --resume {tmp_path / 'kill'}" in lines[0], lines
    assert f'File "{REPO / "applications"}' not in killed.stderr  # no traceback of ours
    assert torch.load(tmp_path / "kill" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(TRAIN), "--no-progress", "--resume", str(tmp_path / "kill")],
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, ref = launch(tmp_path, "ref", 2)
    a = torch.load(tmp_path / "kill" / "last.pt", weights_only=True)
    b = torch.load(ref / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in b["model"])
    assert diff == 0.0, diff
