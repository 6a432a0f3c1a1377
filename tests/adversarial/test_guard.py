"""The run guard of bilevel-train (applications/adversarial/guard.py, and its use by the trainer and the
commands): one process per run directory, resumes that never mislabel a run, hand edits reported, foreign
or unusable checkpoints named, interrupts that keep a resumable checkpoint. Each test failed on the main
branch before the shared run layer (two runs mixed, a changed seed was resumed, config.yaml was
overwritten, a data-cleaning state.pt was "18 config problems", a KeyError / size-mismatch traceback,
SIGTERM printed nothing and SIGINT 89 lines)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _tiny_run import ENV, FAULTS, load, train, write_config

from applications.common.checkpoint import save_atomic


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(FAULTS), "", "--no-progress", *[str(a) for a in args]], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.01)


def test_a_second_run_on_the_same_directory_exits_2_naming_the_first(tmp_path, capsys):
    cfg = write_config(tmp_path, "shared", train={"epochs": 50, "batch_size": 64, "lr_max": 0.2})
    first = _start("--config", cfg)
    try:
        _wait_for(tmp_path / "shared" / ".lock", first)
        second = train(capsys, "--config", cfg, "seed=1")
        assert second.rc == 2 and f"in use by process {first.pid}" in second.err
        assert second.err.count("\n") == 1
    finally:
        first.kill()
        first.communicate()
    assert not (tmp_path / "shared" / "last.pt").exists() or load(tmp_path / "shared" / "last.pt")["config"]["seed"] == 0


def test_a_resume_of_a_run_before_its_first_checkpoint_names_its_process(tmp_path, capsys):
    """--resume while the run is still in its first epoch (no last.pt yet): "in use by process N", not advice to
    start it again with output.overwrite."""
    cfg = write_config(tmp_path, "young", train={"epochs": 50, "batch_size": 64, "lr_max": 0.2})
    first = _start("--config", cfg)
    try:
        _wait_for(tmp_path / "young" / ".lock", first)
        res = train(capsys, "--resume", tmp_path / "young")
        assert res.rc == 2 and f"in use by process {first.pid}" in res.err, res.err
        assert "overwrite" not in res.err
    finally:
        first.kill()
        first.communicate()


def _finished(tmp_path: Path, capsys, name: str = "run", epochs: int = 1) -> Path:
    res = train(capsys, "--config", write_config(tmp_path, name), f"train.epochs={epochs}")
    assert res.rc == 0, res.err
    return tmp_path / name


def test_a_resume_that_changes_what_the_run_is_is_refused(tmp_path, capsys):
    run = _finished(tmp_path, capsys)
    res = train(capsys, "--resume", run / "last.pt")  # a checkpoint instead of its folder: the folder is named
    assert res.rc == 2 and f"--resume takes the run directory, not a file: --resume {run}" in res.err, res.err
    res = train(capsys, "--resume", run, "train.epochs=2", "seed=1", "data.n_val=100")
    assert res.rc == 2
    assert "seed: saved=0 new=1" in res.err and "data.n_val: saved=200 new=100" in res.err
    assert "output.overwrite=true" in res.err
    assert load(run / "last.pt")["epoch"] == 1 and load(run / "last.pt")["config"]["seed"] == 0


def test_a_resume_with_more_epochs_and_a_new_lr_continues_and_records_the_change(tmp_path, capsys):
    run = _finished(tmp_path, capsys)
    res = train(capsys, "--resume", run, "train.epochs=2", "train.lr_max=0.1")
    assert res.rc == 0, res.err
    assert "resumed after epoch 1 with a changed config" in res.out and "train.lr_max 0.2 -> 0.1" in res.out
    change = {"after_epoch": 1, "changes": {"train.epochs": [1, 2], "train.lr_max": [0.2, 0.1]}}
    last = load(run / "last.pt")
    assert last["epoch"] == 2 and last["config_changes"] == [change]
    assert json.loads((run / "results.json").read_text())["config_changes"] == [change]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr_max"] == 0.1
    assert "train.lr_max 0.2 -> 0.1" in (run / "train.log").read_text()


def test_a_hand_edited_config_yaml_is_reported_not_overwritten(tmp_path, capsys):
    run = _finished(tmp_path, capsys)
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["train"]["epochs"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    res = train(capsys, "--resume", run)
    assert res.rc == 2 and "config.yaml differs from its checkpoint" in res.err
    assert "train.epochs: checkpoint=1 file=3" in res.err and f"--resume {run} train.epochs=3" in res.err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3  # kept as the user left it
    res = train(capsys, "--resume", run, "train.epochs=3")  # the suggested command: the file says the same
    assert res.rc == 0, res.err
    assert load(run / "last.pt")["epoch"] == 3


def test_a_data_cleaning_checkpoint_is_named_as_such(tmp_path, capsys):
    run = tmp_path / "dc"
    save_atomic({"run_kind": "datacleaning", "config": {"seed": 0, "methods": []}, "baselines": None, "runs": {}},
                run / "last.pt")
    res = train(capsys, "--resume", run)
    assert res.rc == 2 and "is a data-cleaning (bilevel-datacleaning) checkpoint, not an adversarial-training" in res.err
    from applications.adversarial.evaluate import main as evaluate

    assert evaluate([str(run / "last.pt")]) == 2
    assert "is a data-cleaning (bilevel-datacleaning) checkpoint" in capsys.readouterr().err


def test_a_checkpoint_without_a_usable_config_is_one_line(tmp_path, capsys):
    run = _finished(tmp_path, capsys)
    ck = load(run / "last.pt")
    del ck["config"]
    save_atomic(ck, run / "last.pt")
    res = train(capsys, "--resume", run)
    assert res.rc == 2 and "stores no config" in res.err and "Traceback" not in res.err
    assert res.err.count("\n") == 1


def test_evaluate_of_weights_that_do_not_fit_their_config_is_one_line(tmp_path, capsys):
    from applications.adversarial.evaluate import main as evaluate

    run = _finished(tmp_path, capsys)
    ck = load(run / "best.pt")
    ck["config"]["model"]["options"]["width"] = 16
    save_atomic(ck, run / "best.pt")
    assert evaluate([str(run / "best.pt"), "--n", "10", "--attacks", "clean"]) == 2
    err = capsys.readouterr().err
    assert "the weights do not fit the model its stored config describes" in err and "size mismatch" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("config_bytes, expected", [(bytes(range(256)), "is not UTF-8 text"),
                                                    (b"train:\n  epochs: 1\ntrain:\n  lr_max: 0.1\n",
                                                     "duplicate key 'train'")])
def test_a_binary_or_duplicated_config_is_refused(tmp_path, capsys, config_bytes, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(config_bytes)
    res = train(capsys, "--config", path)
    assert res.rc == 2 and expected in res.err and "Traceback" not in res.err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 4 epochs (the tiny config)."""
    tmp = tmp_path_factory.mktemp("ref")
    proc = _start("--config", write_config(tmp, "ref", train={"epochs": 4, "batch_size": 64, "lr_max": 0.2}))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return load(tmp / "ref" / "last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_mid_epoch_keeps_a_resumable_checkpoint(tmp_path, reference, sig):
    cfg = write_config(tmp_path, "int", train={"epochs": 4, "batch_size": 64, "lr_max": 0.2})
    proc = _start("--config", cfg)
    run = tmp_path / "int"
    _wait_for(run / "last.pt", proc)
    time.sleep(0.2)  # into the next epoch
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(sig), err[-3000:]
    lines = err.strip().splitlines()
    assert lines == [f"interrupted by {sig.name}: the last checkpoint ({run / 'last.pt'}) is kept; resume with: "
                     f"bilevel-train --resume {run}"]
    assert not (run / ".lock").exists() and not list(run.glob(".*.tmp"))
    resumed = _start("--resume", run)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    final = load(run / "last.pt")
    assert final["epoch"] == reference["epoch"] == 4
    for k, v in reference["model"].items():
        assert torch.equal(v, final["model"][k]), k  # replay: the resumed run is the uninterrupted one


def test_config_yaml_changes_only_with_the_first_epoch_saved_under_the_new_config(tmp_path, capsys):
    """A resume with new options that stops before saving an epoch leaves config.yaml as last.pt's config."""
    run = _finished(tmp_path, capsys)
    res = train(capsys, "--resume", run, "train.epochs=2", "train.lr_max=0.1", "train.max_weight=1e-6")
    assert res.rc == 3 and "train.max_weight" in res.err  # diverged: epoch 2 was not saved
    on_disk = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (on_disk["lr_max"], on_disk["max_weight"]) == (0.2, 1e4) == (
        load(run / "last.pt")["config"]["train"]["lr_max"], load(run / "last.pt")["config"]["train"]["max_weight"])
    res = train(capsys, "--resume", run, "train.epochs=2")
    assert res.rc == 0, res.err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2


def test_a_new_run_does_not_take_over_another_runs_records(tmp_path, capsys):
    """A folder whose checkpoints were deleted still holds its results, metrics, plot and evaluations: a new run
    there is refused (exit 2, nothing touched) unless output.overwrite=true, which replaces them all."""
    run = _finished(tmp_path, capsys)
    for name in ("last.pt", "best.pt"):
        (run / name).unlink()
    (run / "eval_best.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = train(capsys, "--config", write_config(tmp_path, "run"), "train.epochs=1", "seed=3")
    assert res.rc == 2 and "holds another run's records" in res.err and "results.json" in res.err, res.err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    res = train(capsys, "--config", write_config(tmp_path, "run"), "train.epochs=1", "seed=3", "output.overwrite=true")
    assert res.rc == 0, res.err
    assert json.loads((run / "results.json").read_text())["seed"] == 3 and not (run / "eval_best.json").exists()


def test_a_changed_resume_with_nothing_to_train_says_the_change_is_not_kept(tmp_path, capsys):
    """The note used to say the change was "recorded in last.pt", which is only rewritten by an epoch: with
    nothing to train it says to pass the change again, and last.pt keeps the previous config."""
    run = _finished(tmp_path, capsys)
    res = train(capsys, "--resume", run, "train.lr_max=0.1")
    assert res.rc == 0, res.err
    assert "nothing to train" in res.out and "pass the changes again with the next --resume" in res.out, res.out
    assert load(run / "last.pt")["config"]["train"]["lr_max"] == 0.2

