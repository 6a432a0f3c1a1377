"""The trainer's failure paths on tiny runs: divergence never replaces a checkpoint, rejected resumes
change nothing, overwrite waits for a ready run, kills between or inside checkpoint writes leave a run
that continues, an early-stopped run can be continued, and the run's records stay consistent."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from _tiny_run import load, metrics, train, train_child, write_config

# epoch 1 trains at lr 0.05; from epoch 2 on at 0.05 * 400 = 20: the loss of epoch 2 is ~1e34, finite
BLOW_UP = ("train.lr_schedule=piecewise", "train.lr_max=0.05", "train.lr_milestones=[1]", "train.lr_gamma=400")


def max_abs_weight(ck):
    return max(v.abs().max().item() for v in ck["model"].values() if v.is_floating_point())


def test_a_blown_up_epoch_replaces_neither_last_nor_best(tmp_path, capsys):
    cfg = write_config(tmp_path, "blow")
    res = train(capsys, "--config", cfg, "train.epochs=3", *BLOW_UP)
    assert res.rc == 3, res.out[-2000:] + res.err[-2000:]
    run = tmp_path / "blow"
    assert "training diverged at epoch 2" in res.err and "train loss" in res.err, res.err
    assert f"--resume {run}" in res.err and "train.lr_max" in res.err  # says what to do
    last, best = load(run / "last.pt"), load(run / "best.pt")
    assert last["epoch"] == 1 and best["epoch"] == 1
    assert max_abs_weight(last) < 10.0 and max_abs_weight(best) < 10.0
    assert [r["epoch"] for r in metrics(run)] == [1]
    # the kept state resumes: at a constant lr 0.05 the run finishes
    res = train(capsys, "--resume", run, "train.lr_gamma=1")
    assert res.rc == 0, res.err[-2000:]
    last = load(run / "last.pt")
    assert last["epoch"] == 3 and all(math.isfinite(r["train_loss"]) and r["train_loss"] < 3 for r in last["history"])


def test_a_rejected_resume_leaves_config_yaml_alone(tmp_path, capsys):
    cfg = write_config(tmp_path, "run")
    assert train(capsys, "--config", cfg, "train.epochs=1").rc == 0
    before = (tmp_path / "run" / "config.yaml").read_text()
    res = train(capsys, "--resume", tmp_path / "run", "data.name=mnist5k")
    assert res.rc == 2 and "incompatible" in res.err and "data.name" in res.err
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert yaml.safe_load(before)["data"]["name"] == "digits"


def test_overwrite_deletes_the_old_run_only_once_the_new_one_is_ready(tmp_path, capsys):
    cfg = write_config(tmp_path, "run")
    run = tmp_path / "run"
    assert train(capsys, "--config", cfg, "train.epochs=1").rc == 0
    (run / "eval_best.json").write_text("{}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz file")
    res = train(capsys, "--config", cfg, "output.overwrite=true", "data.name=npz", f"data.path={garbage}")
    assert res.rc == 2 and str(garbage) in res.err
    assert load(run / "last.pt")["epoch"] == 1 and (run / "best.pt").is_file() and (run / "results.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["name"] == "digits"
    # a ready run replaces everything, the stale evaluation of the old best.pt included
    res = train(capsys, "--config", cfg, "output.overwrite=true", "train.epochs=2")
    assert res.rc == 0, res.err[-2000:]
    assert load(run / "last.pt")["epoch"] == 2 and not (run / "eval_best.json").exists()


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz file")
    cfg = write_config(tmp_path, "run", data={"name": "npz", "path": str(garbage), "n_val": 10})
    res = train(capsys, "--config", cfg)
    assert res.rc == 2 and str(garbage) in res.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_kill_inside_the_first_last_pt_write_leaves_a_run_that_restarts(tmp_path):
    cfg = write_config(tmp_path, "run")
    run = tmp_path / "run"
    res = train_child("--config", cfg, fault="last:1:mid")
    assert res.rc == -9, res.err[-2000:]
    assert list(run.glob(".last.pt.*.tmp"))  # the half-written temporary file of the killed write
    res = train_child("--resume", run)
    assert res.rc == 2 and "start it again without --resume" in res.err, res.err
    res = train_child("--config", cfg)  # a fresh start is allowed: there is no checkpoint to lose
    assert res.rc == 0, res.err[-2000:]
    assert load(run / "last.pt")["epoch"] == 2 and (run / "results.json").is_file()
    assert not list(run.glob(".*.tmp")), list(run.iterdir())  # the stray temporary file is gone


@pytest.mark.slow
def test_results_attribute_best_pt_to_its_own_epoch(tmp_path):
    """Killed between the two checkpoint files of a best epoch E > 1, resumed with nothing left to train
    (the final test evaluates the files as they are), then continued to the end."""
    sections = {"train": {"epochs": 4, "batch_size": 64, "lr_max": 0.2}, "method": {"name": "fast_at", "eps": 0.2}}
    assert train_child("--config", write_config(tmp_path, "ref", **sections)).rc == 0
    flags = [r["is_best"] for r in metrics(tmp_path / "ref")]
    best_epoch = max(e for e, f in enumerate(flags, 1) if f)
    assert best_epoch > 1, flags
    ref_best = load(tmp_path / "ref" / "best.pt")
    # the kill after the k-th best.pt (the one of epoch E) and after last.pt of epoch E: the two orders
    for fault in (f"best:{sum(flags[:best_epoch])}:after", f"last:{best_epoch}:after"):
        name = fault.split(":")[0]
        run = tmp_path / name
        assert train_child("--config", write_config(tmp_path, name, **sections), fault=fault).rc == -9
        res = train_child("--resume", run, f"train.epochs={load(run / 'last.pt')['epoch']}")
        assert res.rc == 0, res.err[-2000:]
        results = json.loads((run / "results.json").read_text())
        best = load(run / "best.pt")
        assert results["test"]["best"]["epoch"] == best["epoch"] == results["best_epoch"], (fault, results)
        assert results["best_val_robust_acc"] == best["val_robust_acc"]
        res = train_child("--resume", run, "train.epochs=4")
        assert res.rc == 0, res.err[-2000:]
        best = load(run / "best.pt")
        assert best["epoch"] == ref_best["epoch"] == best_epoch
        assert all(torch.equal(best["model"][k], v) for k, v in ref_best["model"].items())


CO_ALWAYS = {"enabled": True, "early_stop": True, "min_robust_acc": 0.99, "min_best_robust_acc": 0.0,
             "clean_ratio": 0.0, "patience": 1, "min_clean_acc": 0.0}


def test_an_early_stopped_run_continues_when_early_stop_is_lifted(tmp_path, capsys):
    # every epoch after the first counts as collapsed: the run stops after epoch 2
    cfg = write_config(tmp_path, "co", method={"name": "fast_at", "eps": 0.2}, co=CO_ALWAYS)
    run = tmp_path / "co"
    res = train(capsys, "--config", cfg, "train.epochs=4", "eval.final_test=false")
    assert res.rc == 0 and json.loads((run / "results.json").read_text())["epochs_completed"] == 2
    res = train(capsys, "--resume", run, "eval.final_test=false")
    assert res.rc == 0
    assert "nothing to train" in res.out and "co.early_stop" in res.out, res.out
    res = train(capsys, "--resume", run, "co.early_stop=false", "train.epochs=3", "eval.final_test=false")
    assert res.rc == 0, res.err
    results = json.loads((run / "results.json").read_text())
    assert results["epochs_completed"] == 3 and not results["stopped_early"]
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


def test_co_collapsed_marks_the_onset_epochs(tmp_path, capsys):
    co = dict(CO_ALWAYS, early_stop=False, patience=2)
    cfg = write_config(tmp_path, "co", method={"name": "fast_at", "eps": 0.2}, co=co)
    res = train(capsys, "--config", cfg, "train.epochs=3", "eval.final_test=false")
    assert res.rc == 0, res.err
    results = json.loads((tmp_path / "co" / "results.json").read_text())
    assert results["catastrophic_overfitting"]["epoch"] == 2  # onset 2, confirmed at 3
    assert [r["co_collapsed"] for r in metrics(tmp_path / "co")] == [False, True, True]


def test_train_time_never_exceeds_wall_time_after_a_resume(tmp_path, capsys):
    cfg = write_config(tmp_path, "run", method={"name": "fast_bat", "eps": 0.2})
    assert train(capsys, "--config", cfg, "train.epochs=3", "eval.final_test=false").rc == 0
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    assert first["train_time_s"] <= first["wall_time_s"]
    assert train(capsys, "--resume", tmp_path / "run", "eval.final_test=false").rc == 0
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["train_time_s"] == pytest.approx(first["train_time_s"])
    assert again["train_time_s"] <= again["wall_time_s"], again


def test_the_gap_signature_flags_a_run_that_only_defeats_its_own_attack(tmp_path, capsys):
    """Planted: FGSM with a step of 0.001 at eps 0.2 is noise augmentation, no attack. Once trained
    (epoch 2) the network is right on its training inputs and wrong under PGD, while validation robust
    accuracy never reaches a reference level: only the gap on the same training images reveals it. The
    same run with the real FGSM step (1.25 eps) shows no gap."""
    for name, method, flagged in (("gap", {"name": "fast_at", "eps": 0.2, "step_size": 0.001}, True),
                                  ("fgsm", {"name": "fast_at", "eps": 0.2}, False)):
        cfg = write_config(tmp_path, name, method=method)
        res = train(capsys, "--config", cfg, "train.epochs=3", "eval.final_test=false", "eval.val_n=100")
        assert res.rc == 0, res.err
        co = json.loads((tmp_path / name / "results.json").read_text())["catastrophic_overfitting"]
        rows = metrics(tmp_path / name)
        gaps = [r["train_attack_acc"] - r["train_pgd_acc"] for r in rows]
        if flagged:
            assert gaps[1] >= 0.5 and gaps[2] >= 0.5 and rows[1]["train_attack_acc"] >= 0.5, rows
            assert max(r["val_robust_acc"] for r in rows) < 0.25  # never a robust reference
            assert co["detected"] and co["epoch"] == 2 and "training attack" in co["message"], co
            assert [r["co_collapsed"] for r in rows] == [False, True, True]
        else:
            assert max(gaps) < 0.2 and not co["detected"], (gaps, co)


def test_the_final_test_of_a_best_last_checkpoint_is_the_last_models_own(tmp_path, capsys):
    """When the best epoch is the last, "last" reuses "best"'s numbers: they equal a fresh seeded PGD run
    on the last checkpoint's weights, so skipping the second evaluation changes no number."""
    from applications.adversarial.build import build_run_model, load_run_data
    from applications.adversarial.config import config_from_dict
    from applications.adversarial.distributed import DistContext
    from applications.adversarial.evaluation import evaluate_robust
    from applications.adversarial.seeds import Stream, mix_seed

    cfg_path = write_config(tmp_path, "one")
    res = train(capsys, "--config", cfg_path, "train.epochs=1")
    assert res.rc == 0, res.err[-2000:]
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    best, last = results["test"]["best"], results["test"]["last"]
    assert best["epoch"] == last["epoch"] == 1 and last["time_s"] == 0.0
    ck = load(tmp_path / "one" / "last.pt")
    cfg = config_from_dict(ck["config"])
    model = build_run_model(cfg, ck["data_info"])
    model.load_state_dict(ck["model"])
    test = load_run_data(cfg, torch.device("cpu"), need_train=False).test
    fresh = evaluate_robust(model, test, cfg.eval.test_n, cfg.eps, cfg.eval.test_steps, cfg.eval.test_restarts,
                            cfg.eval.test_step_size, cfg.eval.batch_size, mix_seed(cfg.seed, Stream.TEST),
                            DistContext(0, 1, 0, torch.device("cpu"), False))
    assert (last["clean_acc"], last["robust_acc"]) == (fresh["clean_acc"], fresh["robust_acc"])
    assert 0.0 < fresh["robust_acc"] < fresh["clean_acc"]


def test_autoattack_on_the_best_checkpoint_is_recorded_and_printed(tmp_path, capsys):
    """eval.autoattack_n: the recorded accuracy is standard AutoAttack's on the first n test images of
    best.pt (the same call made directly gives the same number), no higher than the clean accuracy."""
    pytest.importorskip("pyautoattack")
    from applications.adversarial.build import build_run_model, load_run_data
    from applications.adversarial.config import config_from_dict
    from applications.adversarial.evaluation import autoattack_accuracy

    cfg_path = write_config(tmp_path, "aa")
    res = train(capsys, "--config", cfg_path, "train.epochs=1", "eval.autoattack_n=30")
    assert res.rc == 0, res.err[-2000:]
    best = json.loads((tmp_path / "aa" / "results.json").read_text())["test"]["best"]
    assert best["autoattack_n"] == 30 and "standard AutoAttack" in res.out and "first 30 test images" in res.out
    ck = load(tmp_path / "aa" / "best.pt")
    cfg = config_from_dict(ck["config"])
    model = build_run_model(cfg, ck["data_info"])
    model.load_state_dict(ck["model"])
    test = load_run_data(cfg, torch.device("cpu"), need_train=False).test
    direct = autoattack_accuracy(model, test.x[:30], test.y[:30], cfg.eps, seed=cfg.seed)
    assert best["autoattack_acc"] == direct["robust_acc"] <= direct["clean_acc"]
    # the accuracy after each of standard AutoAttack's attacks, the last one its result, and its checks' warnings
    per = best["autoattack_per_attack"]
    order = ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(per) == order[:len(per)] and per and per == direct["per_attack"]  # it stops once nothing is robust
    assert list(per.values()) == sorted(per.values(), reverse=True)  # each attack runs on the points still robust
    assert list(per.values())[-1] == pytest.approx(best["autoattack_acc"], abs=1e-4)
    assert best["autoattack_warnings"] == direct["warnings"]


def test_autoattack_without_pyautoattack_is_a_config_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyautoattack" else real(name, *a))
    res = train(capsys, "--config", write_config(tmp_path, "noaa"), "eval.autoattack_n=30")
    assert res.rc == 2 and "eval.autoattack_n" in res.err and 'pip install "bilevel[autoattack]"' in res.err
    assert not (tmp_path / "noaa").exists()
    # the configuration itself stays loadable (a stored one must be evaluable on this machine)
    from applications.adversarial.config import load_config

    assert load_config(tmp_path / "noaa.yaml", ["eval.autoattack_n=30"]).eval.autoattack_n == 30


def test_without_the_final_test_autoattack_is_off_with_a_note(tmp_path, capsys):
    """``bilevel-train eval.final_test=false`` over the quickstart (autoattack_n: 100) used to be refused; and
    ``eval.autoattack_n=0`` ("must be > 0") too: 0 now means off, like null."""
    from applications.adversarial.config import QUICKSTART, load_config

    assert load_config(QUICKSTART, ["eval.final_test=false"]).eval.autoattack_runs is False
    assert load_config(QUICKSTART, ["eval.autoattack_n=0"]).eval.autoattack_n is None
    res = train(capsys, "--config", write_config(tmp_path, "nofinal"), "train.epochs=1", "eval.autoattack_n=30",
                "eval.final_test=false")
    assert res.rc == 0, res.err
    assert "eval.autoattack_n=30 not run" in res.out and "eval.final_test=false" in res.out
    results = json.loads((tmp_path / "nofinal" / "results.json").read_text())
    assert results["test"] == {}


def test_a_failing_autoattack_keeps_the_pgd_results(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyautoattack")
    import applications.adversarial.final as final_mod

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(final_mod, "autoattack_accuracy", broken)
    res = train(capsys, "--config", write_config(tmp_path, "aafail"), "train.epochs=1", "eval.autoattack_n=30")
    assert res.rc == 0 and "AutoAttack failed (RuntimeError: out of memory)" in res.out
    best = json.loads((tmp_path / "aafail" / "results.json").read_text())["test"]["best"]
    assert best["autoattack_error"] == "RuntimeError: out of memory" and 0.0 <= best["robust_acc"] <= 1.0
