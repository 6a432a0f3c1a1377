"""benchmarks/small_scale.py: every (setting, method) is a valid training config with the intended method
options, a tiny study writes one JSON per run and resumes without retraining, and the summary's means,
standard deviations and catastrophic-overfitting counts are those of the per-run records."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import small_scale  # noqa: E402


def _args(**kw):
    base = dict(tiny=False, test_n=1000, restarts=1, aa_n=500, aa_seeds=[0], aa_version="standard",
                data=Path("/nonexistent/cifar10-jpg.tar.gz"))
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("setting", sorted(small_scale.SETTINGS))
def test_every_method_is_a_valid_config_with_its_options(setting):
    from applications.adversarial.config import load_config
    from applications.adversarial.methods import build_method

    s = small_scale.SETTINGS[setting]
    eps = s.eps
    seen = {}
    for key, method in small_scale.METHODS.items():
        cfg = load_config(None, small_scale.spec(s, method, 0, _args())["overrides"])
        assert math.isclose(cfg.eps, eps, rel_tol=1e-12), key  # the evaluation radius, standard training too
        assert cfg.eval.test_n == 1000 and cfg.eval.test_steps == 50 and cfg.eval.test_restarts == 1
        seen[key] = build_method(cfg.method.name, **cfg.method.options)
    assert seen["fast_at"].step_size == pytest.approx(1.25 * eps)
    assert seen["fast_at_2eps"].step_size == pytest.approx(2 * eps)
    assert seen["fast_bat_exact"].lam is None and seen["fast_bat"].lam == 10 and math.isinf(seen["fast_bat_noig"].lam)
    assert type(seen["fast_bat_fd"].products).__name__ == "ForwardDifference"
    assert type(seen["fast_bat"].products).__name__ == "Exact"
    assert seen["pgd10"].steps == 10 and seen["pgd10"].step_size == pytest.approx(eps / 4)
    assert seen["grad_align"].ga_coef == {"mnist": 2.0, "cifar10_8": 0.2, "cifar10_16": 2.0}[setting]


def _record(setting, method, seed, best, last, co, aa=None):
    test = {"best": {"epoch": 3, "n": 100, "clean_acc": best[0], "pgd_acc": best[1], "time_s": 1.0},
            "last": {"epoch": 4, "n": 100, "clean_acc": last[0], "pgd_acc": last[1], "time_s": 1.0}}
    if aa is not None:
        test["best"]["autoattack"] = {"n": 50, "version": "standard", "clean_acc": best[0], "aa_acc": aa, "time_s": 2.0}
    return {"spec": {"setting": setting, "method": method, "seed": seed, "overrides": []},
            "epochs": 4, "best_epoch": 3, "s_per_epoch": 2.0 + seed, "train_time_s": 8.0, "wall_time_s": 10.0,
            "test_attack": "PGD-50-1, step eps/4", "test": test, "co_detected": co, "co_epoch": 4 if co else None,
            "curve": [{"epoch": e, "val_clean_acc": 0.5, "val_robust_acc": 0.1 * e + 0.01 * seed, "train_loss": 1.0}
                      for e in range(1, 5)]}


def test_summary_statistics_are_those_of_the_runs(tmp_path):
    out = tmp_path / "small_scale"
    (out / "mnist").mkdir(parents=True)
    best = [(0.9, 0.40), (0.8, 0.46), (0.85, 0.43)]
    last = [(0.95, 0.10), (0.9, 0.45), (0.9, 0.41)]
    for seed in range(3):
        rec = _record("mnist", "fast_at", seed, best[seed], last[seed], co=seed == 0, aa=0.33 if seed == 0 else None)
        (out / "mnist" / f"fast_at_seed{seed}.json").write_text(json.dumps(rec))
    (out / "mnist" / "pgd10_seed0.json").write_text(json.dumps({"spec": {"setting": "mnist", "method": "pgd10", "seed": 0},
                                                                 "error": "Traceback ..."}))
    summary = small_scale.summarize(out, "t", plots=False)
    rows = {r["method"]: r for r in summary["rows"]}
    fa = rows["fast_at"]
    assert fa["best_pgd"]["mean"] == pytest.approx(100 * statistics.mean(b[1] for b in best))
    assert fa["best_pgd"]["std"] == pytest.approx(100 * statistics.stdev(b[1] for b in best))
    assert fa["last_pgd"]["mean"] == pytest.approx(100 * statistics.mean(v[1] for v in last))
    assert fa["best_aa"] == {"mean": pytest.approx(33.0), "std": 0.0, "n": 1} and fa["aa_seeds"] == [0]
    assert fa["co_runs"] == 1 and fa["runs"] == 3 and fa["s_per_epoch"] == pytest.approx(3.0)
    assert fa["lost_runs"] == 1  # seed 0: last 0.10 < 0.40 / 2; seeds 1, 2 kept theirs
    assert rows["pgd10"]["runs"] == 0 and rows["pgd10"]["failed_seeds"] == [0]
    md = (tmp_path / "t.md").read_text()
    assert fa["best_pgd_aa_seeds"]["mean"] == pytest.approx(40.0)  # the AutoAttacked checkpoint's own PGD
    assert "| Fast-AT (1.25 eps) | 0,1,2 | 85.0 ± 5.0 | 43.0 ± 3.0 | 33.0 vs 40.0 (seed 0) |" in md
    assert "| 1/3 | 1/3 | 0/3 |" in md and "Failed runs: PGD-10-AT (step eps/4) (seeds [0])" in md
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["co_runs"] == 1


def _run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/small_scale.py", *map(str, args)], capture_output=True, text=True,
                          cwd=str(REPO), timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_tiny_study_writes_each_run_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "json"
    common = ["--tiny", "--jobs", "2", "--seeds", "0", "1", "--work", work, "--out", out, "--test-n", "20", "--aa-n", "20"]
    stdout = _run(common)
    assert "4 run(s) to train and 2 AutoAttack evaluation(s)" in stdout
    paths = sorted(out.glob("mnist/*.json"))
    assert [p.name for p in paths] == ["fast_at_seed0.json", "fast_at_seed1.json", "fast_bat_seed0.json",
                                       "fast_bat_seed1.json"]
    for p in paths:
        rec = json.loads(p.read_text())
        assert "error" not in rec
        assert rec["epochs"] == 1 and len(rec["curve"]) == 1 and rec["test"]["last"]["n"] == 20
        assert 0.0 <= rec["test"]["last"]["pgd_acc"] <= 1.0 and rec["s_per_epoch"] > 0
        aa = rec["test"]["best"].get("autoattack")
        assert (aa is not None) == (rec["spec"]["seed"] == 0)  # --aa-seeds defaults to seed 0
        if aa is not None:
            assert aa["version"] == "apgd-ce" and aa["n"] == 20 and aa["aa_acc"] <= aa["clean_acc"]
            assert aa["per_attack"] == {"apgd-ce": pytest.approx(aa["aa_acc"], abs=1e-4)} and aa["warnings"] == []
    summary = json.loads((tmp_path / "json").parent.joinpath("small_scale_tiny.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"fast_at", "fast_bat"} and summary["runs"] == 4
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert "0 run(s) to train and 0 AutoAttack evaluation(s)" in _run(common)  # resumed: nothing redone
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # another AutoAttack evaluation is redone on the kept checkpoints, without training
    assert "0 run(s) to train and 2 AutoAttack evaluation(s)" in _run([*common[:-1], "10"])
    assert json.loads((out / "mnist" / "fast_bat_seed0.json").read_text())["test"]["best"]["autoattack"]["n"] == 10
    # a changed specification (another test subset) is trained again
    assert "4 run(s) to train" in _run([*common[:-4], "--test-n", "30", "--aa-n", "20"])
