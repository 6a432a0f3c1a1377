"""benchmarks/study_runs.py: a run's record is resumable exactly while its spec is unchanged and error-free,
an AutoAttack evaluation is redone only when its size or version changes, a diverged run is an outcome with
its best checkpoint tested (the trainer's own numbers), and a failed training leaves its traceback in the
run's JSON without stopping the pool."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import small_scale, study_runs  # noqa: E402

SPEC = {"setting": "mnist", "method": "fast_at", "seed": 1, "overrides": ["train.epochs=2"]}


def _write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def test_a_record_is_done_only_for_its_own_spec_without_error(tmp_path):
    path = study_runs.result_path(tmp_path, SPEC)
    assert path == tmp_path / "mnist" / "fast_at_seed1.json"
    assert not study_runs.is_done(path, SPEC)  # absent
    _write(path, '{"spec": ')
    assert not study_runs.is_done(path, SPEC)  # corrupt: trained again
    _write(path, {"spec": SPEC, "error": "Traceback ..."})
    assert not study_runs.is_done(path, SPEC)  # failed: trained again
    _write(path, {"spec": SPEC, "test": {}})
    assert study_runs.is_done(path, SPEC)
    assert not study_runs.is_done(path, {**SPEC, "overrides": ["train.epochs=3"]})  # another spec


def test_autoattack_is_redone_only_when_its_size_or_version_changes(tmp_path):
    aa = {"n": 500, "version": "standard"}
    path = study_runs.result_path(tmp_path, SPEC)
    assert not study_runs.needs_autoattack(path, aa)  # not trained: nothing to evaluate
    _write(path, {"spec": SPEC, "test": {}})
    assert not study_runs.needs_autoattack(path, aa)  # no best checkpoint (diverged in epoch 1)
    _write(path, {"spec": SPEC, "error": "Traceback ..."})
    assert not study_runs.needs_autoattack(path, aa)
    best = {"epoch": 2, "clean_acc": 0.9, "pgd_acc": 0.5}
    _write(path, {"spec": SPEC, "test": {"best": best}})
    assert study_runs.needs_autoattack(path, aa)
    _write(path, {"spec": SPEC, "test": {"best": {**best, "autoattack": {**aa, "aa_acc": 0.4}}}})
    assert not study_runs.needs_autoattack(path, aa)
    assert study_runs.needs_autoattack(path, {**aa, "n": 100})
    assert study_runs.needs_autoattack(path, {**aa, "version": "apgd-ce"})


def test_an_evaluation_already_added_by_another_invocation_is_not_redone(tmp_path, monkeypatch):
    aa = {"n": 500, "version": "standard"}
    calls = []
    monkeypatch.setattr(study_runs, "autoattack_best", lambda ckpt, a: calls.append(ckpt) or {**a, "aa_acc": 0.3})
    ckpt = tmp_path / "work" / "mnist_fast_at_seed1" / "best.pt"
    _write(ckpt, "weights")
    best = {"epoch": 2, "clean_acc": 0.9, "pgd_acc": 0.5}
    path = _write(study_runs.result_path(tmp_path / "json", SPEC), {"spec": SPEC, "test": {"best": best}})
    rec = study_runs.autoattack_one(SPEC, aa, tmp_path / "json", tmp_path / "work")
    assert calls == [ckpt] and rec["test"]["best"]["autoattack"]["aa_acc"] == 0.3
    assert json.loads(path.read_text()) == rec
    study_runs.autoattack_one(SPEC, aa, tmp_path / "json", tmp_path / "work")  # queued twice: evaluated once
    assert calls == [ckpt]
    study_runs.autoattack_one(SPEC, {**aa, "n": 100}, tmp_path / "json", tmp_path / "work")  # another size: again
    assert len(calls) == 2


def test_unreadable_records_are_skipped_with_a_warning(tmp_path, capsys):
    _write(study_runs.result_path(tmp_path, SPEC), {"spec": SPEC})
    _write(study_runs.result_path(tmp_path, {**SPEC, "seed": 2}), "not json")
    assert study_runs.load_records(tmp_path) == [{"spec": SPEC}]
    assert "unreadable" in capsys.readouterr().err


def test_a_failed_training_is_recorded_and_the_pool_goes_on(tmp_path, capsys):
    bad = {**SPEC, "overrides": ["train.no_such_key=1"]}
    failed = study_runs.run_pool([bad], [], {"n": 10, "version": "apgd-ce"}, tmp_path / "json", tmp_path / "work",
                                 jobs=1, evaluate_after=lambda s: True)
    assert failed == 1
    record = json.loads(study_runs.result_path(tmp_path / "json", bad).read_text())
    assert record["spec"] == bad and "no_such_key" in record["error"]
    out = capsys.readouterr().out
    assert "[1/2] train mnist/fast_at seed 1: FAILED" in out  # its evaluation was never queued
    assert not study_runs.is_done(study_runs.result_path(tmp_path / "json", bad), bad)


DIGITS = ("device=cpu", "cpu_threads=1", "seed=0", "data.name=digits", "data.n_val=200", "model.name=small_cnn",
          "model.options={width: 8}", "method.name=standard", "eval.eps=0.2", "train.batch_size=64", "eval.val_n=50",
          "eval.val_steps=3", "eval.test_n=50", "eval.test_steps=3", "eval.test_restarts=1",
          # epoch 1 at lr 0.05, then 0.05 * 400: epoch 2 diverges
          "train.lr_schedule=piecewise", "train.lr_max=0.05", "train.lr_milestones=[1]", "train.lr_gamma=400")


def test_a_diverged_run_is_an_outcome_with_its_best_checkpoint_tested(tmp_path):
    """Divergence is recorded (epoch, no last checkpoint) and best.pt gets the trainer's own final test:
    the same numbers as a run that stops after that epoch."""
    from applications.adversarial.config import load_config
    from applications.adversarial.trainer import train

    s = {"setting": "mnist", "method": "standard", "seed": 0, "overrides": [*DIGITS, "train.epochs=3"]}
    record = study_runs.run_one(s, tmp_path / "json", tmp_path / "work")
    assert record["diverged"]["epoch"] == 2 and "training diverged" in record["diverged"]["message"]
    assert set(record["test"]) == {"best"} and record["test"]["best"]["epoch"] == 1 and record["epochs"] == 1
    reference = train(load_config(None, [*DIGITS, "train.epochs=1", f"output.dir={tmp_path}", "output.name=ref"]),
                      progress=False)["test"]["best"]
    best = record["test"]["best"]
    assert (best["clean_acc"], best["pgd_acc"]) == (reference["clean_acc"], reference["robust_acc"])
    summary = small_scale.summarize(tmp_path / "json", "t", plots=False)
    (row,) = summary["rows"]
    assert row["diverged_runs"] == 1 and row["diverged_epochs"] == [2] and row["last_pgd"] is None
    assert "| 1/1 (epoch 2) |" in (tmp_path / "t.md").read_text()
