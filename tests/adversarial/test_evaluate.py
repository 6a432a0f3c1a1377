"""evaluate.py reproduces the trainer's final test numbers from the checkpoint alone."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "applications" / "adversarial" / "train.py"
EVALUATE = REPO / "applications" / "adversarial" / "evaluate.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = {"seed": 1, "device": "cpu", "data": {"name": "digits", "n_val": 200},
           "model": {"name": "small_cnn", "options": {"width": 8}}, "method": {"name": "fast_at", "eps": 0.2},
           "train": {"epochs": 4, "batch_size": 64, "lr_max": 0.2},
           "eval": {"val_n": 100, "test_n": 150, "test_steps": 10, "test_restarts": 2},
           "output": {"dir": str(tmp), "name": "run"}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(tmp / "c.yaml")], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def evaluate(*args: str):
    return subprocess.run([sys.executable, str(EVALUATE), *args], capture_output=True, text=True, timeout=300, env=ENV)


def test_evaluate_reproduces_the_trainer(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    out = run_dir / "e.json"
    proc = evaluate(str(run_dir / "last.pt"), "--n", "150", "--pgd-steps", "10", "--pgd-restarts", "2",
                    "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(out.read_text())
    last = results["test"]["last"]
    assert ev["n"] == 150 and ev["epoch"] == last["epoch"] == 4
    assert ev["results"]["clean"]["accuracy"] == last["clean_acc"]
    # same subset, same seeded random starts, same device: the PGD number is reproduced exactly
    assert ev["results"]["pgd"]["accuracy"] == last["robust_acc"]
    assert ev["results"]["pgd"]["step_size"] == pytest.approx(0.05)
    assert "PGD-10-2" in proc.stdout and "clean" in proc.stdout
    # both records carry the labels of what ran: the seed and the method's options as resolved (fast_at's step
    # 1.25 eps from eps 0.2), and the evaluation keeps the training eps beside its own
    options = {"eps": 0.2, "step_size": pytest.approx(0.25), "random_start": True, "update_bn_on_attack": False}
    assert results["seed"] == ev["seed"] == 1 and results["method_options"] == ev["method_options"] == options
    assert ev["train_eps"] == ev["eps"] == 0.2
    assert "fast_at (eps=0.2, step_size=0.25" in (run_dir / "train.log").read_text()
    # a run directory means its best checkpoint; a data path for embedded data is said to be ignored
    proc = evaluate(str(run_dir), "--n", "150", "--attacks", "clean", "--data-path", "/nowhere")
    assert proc.returncode == 0, proc.stderr
    assert "note: --data-path is ignored: digits is embedded" in proc.stdout
    ev_best = json.loads((run_dir / "eval_best.json").read_text())
    assert ev_best["results"]["clean"]["accuracy"] == results["test"]["best"]["clean_acc"]


def test_evaluate_rejects_bad_input(run_dir, tmp_path):
    proc = evaluate(str(run_dir / "last.pt"), "--attacks", "pgd,cw", "--eps", "3")
    assert proc.returncode == 2 and "--attacks: unknown ['cw']" in proc.stderr and "--eps" in proc.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    proc = evaluate(str(junk))
    assert proc.returncode == 2 and "cannot load checkpoint" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None, reason="pyautoattack not installed")
def test_autoattack_subset(run_dir):
    out = run_dir / "aa.json"
    proc = evaluate(str(run_dir / "last.pt"), "--n", "40", "--attacks", "clean,autoattack",
                    "--aa-version", "apgd-ce", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(out.read_text())
    aa = ev["results"]["autoattack"]["accuracy"]
    assert 0.0 <= aa <= ev["results"]["clean"]["accuracy"]


@pytest.mark.parametrize("bad, message", [
    (["--aa-version", "apgd-xx"], "--aa-version: unknown attack 'apgd-xx'"),
    (["--output", "{missing}/e.json"], "--output: directory"),
])
def test_options_are_checked_before_any_attack_runs(run_dir, tmp_path, monkeypatch, capsys, bad, message):
    from applications.adversarial import evaluate as evaluate_module

    def never(*args, **kwargs):
        raise AssertionError("an attack ran before the options were checked")

    for name in ("evaluate_clean", "evaluate_robust", "autoattack_accuracy"):
        monkeypatch.setattr(evaluate_module, name, never)
    bad = [b.format(missing=tmp_path / "missing") for b in bad]
    rc = evaluate_module.main([str(run_dir / "last.pt"), "--attacks", "clean,pgd,autoattack", *bad])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_autoattacks_checks_are_printed_and_recorded(run_dir, tmp_path, monkeypatch, capsys):
    """A check AutoAttack raises (here, as if Square had beaten the gradient attacks) is printed as a warning
    and kept in the JSON beside the accuracy after each attack."""
    from applications.adversarial import evaluate as evaluate_module

    flag = "Square Attack has decreased the robust accuracy of 1.40%."

    def fake(model, x, y, eps, **kwargs):
        return {"clean_acc": 0.9, "robust_acc": 0.5, "n": len(y), "per_attack": {"apgd-ce": 0.6, "square": 0.5},
                "warnings": [flag]}

    monkeypatch.setattr(evaluate_module, "autoattack_accuracy", fake)
    out = tmp_path / "e.json"
    rc = evaluate_module.main([str(run_dir / "last.pt"), "--attacks", "autoattack", "--n", "20", "--output", str(out)])
    printed = capsys.readouterr()
    assert rc == 0 and f"WARNING: AutoAttack's check: {flag}" in printed.out + printed.err
    res = json.loads(out.read_text())["results"]["autoattack"]
    assert res["warnings"] == [flag] and res["per_attack"] == {"apgd-ce": 0.6, "square": 0.5} and res["accuracy"] == 0.5


def test_an_interrupted_evaluation_says_what_it_left(run_dir, tmp_path):
    """Ctrl-C during an evaluation: exit 130 and "the evaluation stopped; nothing was written", not the trainer's
    "stopped before the run started"."""
    import signal
    import time

    out = tmp_path / "never.json"
    proc = subprocess.Popen([sys.executable, str(EVALUATE), str(run_dir / "last.pt"), "--attacks", "pgd", "--n",
                             "150", "--pgd-steps", "1000000", "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(ENV, PYTHONUNBUFFERED="1"))
    first = proc.stdout.readline()  # "evaluating ...": loaded, the attack begins
    assert first.startswith("evaluating "), (first, proc.communicate(timeout=60)[1][-2000:])
    time.sleep(0.5)  # inside the long attack
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "the evaluation stopped; nothing was written" in err and not out.exists()
