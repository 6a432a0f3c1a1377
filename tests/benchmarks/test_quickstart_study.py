"""benchmarks/quickstart_study.py: every run it plans is a valid configuration of the intended recipe, the
tuning gives every method the same budget (all candidates on the first seed, the top ones on the others),
the summary's statistics and stability criterion are those of the per-run records, a tiny study runs and
resumes, and the reference the main job prints (applications/adversarial/reference.py) is the committed
study's stability row for the config file as it is."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import quickstart_study as qs  # noqa: E402
from benchmarks import study_runs  # noqa: E402


def _args(out, **kw):
    base = dict(tiny=False, out=Path(out), seeds=[0, 1, 2, 3, 4], tune_seeds=[0, 1], top=2, only=[])
    return argparse.Namespace(**{**base, **kw})


def test_every_planned_run_is_a_valid_config_of_its_recipe(tmp_path):
    from applications.adversarial.config import load_config

    for phase in ("tune", "ablation", "stability") + (("compare",) if qs.SELECTED else ()):
        for s in qs.specs(phase, _args(tmp_path)):
            cfg = load_config(REPO / s["config"], s["overrides"])
            assert cfg.eps == pytest.approx(0.3) and cfg.seed == s["seed"] and cfg.eval.autoattack_n is None
            assert cfg.data.name == "mnist5k" and cfg.model.name == "small_cnn"
            name = s["method"].split("__")[0]
            assert cfg.method.name == {"fast_bat_t1": "fast_bat", "fast_bat_t2": "fast_bat", "pgd10": "pgd"}.get(name, name)
            assert cfg.eval.final_test is (phase not in ("tune", "ablation"))  # tuning never looks at the test images
            assert cfg.cpu_threads == (int(name[-1]) if name.startswith("fast_bat_t") else 1)
    sizes = {m: len(c) for m, c in qs.CANDIDATES.items()}
    assert set(sizes) == {"fast_bat", "fast_at", "pgd10"} and len(set(sizes.values())) == 1  # the same budget


def test_the_quickstart_is_fast_bats_selected_candidate_and_every_method_has_one():
    assert set(qs.SELECTED) == set(qs.CANDIDATES)
    for method, key in qs.SELECTED.items():
        assert key in qs.CANDIDATES[method]
    selected = qs.resolved([*qs.CANDIDATES["fast_bat"][qs.SELECTED["fast_bat"]], *qs._TUNE])
    assert selected == qs.resolved(qs._TUNE)  # the config file is that candidate, up to nothing


def _row(method, key, seeds, score, stable=True):
    return {"method": method, "candidate": key, "seeds": seeds, "score": score, "stable": stable}


def test_select_takes_the_best_stable_candidate_of_those_run_on_every_tuning_seed():
    rows = [_row("fast_bat", "a", [0], 0.90),                        # best on seed 0, never run on seed 1
            _row("fast_bat", "b", [0, 1], 0.80, stable=False),       # best of the two-seed ones, but unstable
            _row("fast_bat", "c", [0, 1], 0.78), _row("fast_bat", "d", [0, 1], 0.78),  # a tie: the earlier
            _row("fast_at", "e", [0], 0.5, stable=False)]            # no stable candidate: no choice
    assert qs.select(rows) == {"fast_bat": "c"}


def test_selected_is_the_choice_of_the_committed_tuning_records():
    summary = json.loads((REPO / "benchmarks" / "results" / f"{qs.NAME}.json").read_text())
    assert summary["selected"] == qs.SELECTED  # the committed comparison ran the recipes SELECTED names
    assert qs.select(summary["tune"]) == qs.SELECTED
    assert {(r["method"], r["candidate"]) for r in summary["tune"]} == {(m, k) for m, c in qs.CANDIDATES.items() for k in c}
    for method, key in qs.BASE.items():  # round 2 is built on round 1's choice by the same rule
        round1 = [r for r in summary["tune"] if r["method"] == method and r["candidate"] in qs.ROUND1[method]]
        assert qs.select(round1)[method] == key
    for method, key in qs.BASE3.items():  # and round 3 on round 2's
        rounds12 = [r for r in summary["tune"] if r["method"] == method
                    and (r["candidate"] in qs.ROUND1[method] or r["candidate"] in qs.ROUND2[method])]
        assert qs.select(rounds12)[method] == key


def test_the_ablation_is_the_chosen_fast_bat_recipe_without_its_implicit_term(tmp_path):
    from applications.adversarial.methods import build_method

    (abl,) = [s for s in qs.specs("ablation", _args(tmp_path)) if s["seed"] == 0]
    tuned = qs.resolved([*qs.CANDIDATES["fast_bat"][qs.SELECTED["fast_bat"]], *qs._TUNE, "seed=0", "device=cpu",
                         "eval.autoattack_n=0"])
    assert abl["resolved"]["method"] == {**tuned["method"], "lam": float("inf")}
    assert {k: v for k, v in abl["resolved"].items() if k != "method"} == {k: v for k, v in tuned.items() if k != "method"}
    assert build_method(**abl["resolved"]["method"]).requires_double_backward is False  # no implicit term at all


def _write(out, s, curve, co=False, test=None):
    path = study_runs.result_path(out, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"spec": s, "curve": [{"epoch": i + 1, "val_clean_acc": 0.9, "val_robust_acc": v, "train_loss": 1.0}
                                for i, v in enumerate(curve)],
           "co_detected": co, "s_per_epoch": 2.0, "wall_time_s": 30.0, "best_epoch": len(curve), "test": test or {}}
    path.write_text(json.dumps(rec))
    return rec


def test_later_tuning_seeds_wait_for_the_first_and_take_the_top_of_each_method(tmp_path):
    args = _args(tmp_path)
    first = qs.specs("tune", args)
    n = sum(len(c) for c in qs.CANDIDATES.values())
    assert len(first) == n and {s["seed"] for s in first} == {0}
    for i, s in enumerate(first):  # a distinct last validation score per candidate: the higher i, the better
        _write(tmp_path, s, [0.1, 0.2 + 0.01 * i])
    later = [s for s in qs.specs("tune", args) if s["seed"] == 1]
    assert len(later) == 2 * len(qs.CANDIDATES)
    for method, cands in qs.CANDIDATES.items():
        top = [f"{method}__{k}" for k in list(cands)[-2:]]
        assert sorted(s["method"] for s in later if s["method"].startswith(method + "__")) == sorted(top)
    assert len(qs.plan(["tune"], args)) == len(later)  # the first round is done


def test_the_summary_is_that_of_the_records(tmp_path):
    out = tmp_path / "quickstart_study"
    args = _args(out)
    last_pgd = [0.50, 0.52, 0.47, 0.55, 0.49, 0.51, 0.50, 0.53, 0.48, 0.52]
    runs = [s for s in qs.specs("stability", args)]
    assert len(runs) == 10
    for s, v in zip(runs, last_pgd):
        test = {"best": {"epoch": 14, "n": 500, "clean_acc": 0.97, "pgd_acc": v + 0.01},
                "last": {"epoch": 15, "n": 500, "clean_acc": 0.98, "pgd_acc": v}}
        _write(out, s, [0.2, v], co=False, test=test)
    summary = qs.summarize(out, aa_n=500, name="t")
    st = summary["stability"]
    assert st["runs"] == 10 and st["co_runs"] == 0
    assert st["last_pgd"]["mean"] == pytest.approx(statistics.mean(last_pgd))
    assert st["last_pgd"]["std"] == pytest.approx(statistics.stdev(last_pgd))
    assert (st["last_pgd"]["min"], st["last_pgd"]["max"]) == (0.47, 0.55)
    assert st["best_minus_last_pgd_max"] == pytest.approx(0.01)
    assert st["criterion"] == {"last_pgd_std_le_0.03": True, "last_within_0.05_of_best": True, "co_never": True}
    assert st["by_threads"]["fast_bat_t2"]["last_pgd"]["mean"] == pytest.approx(statistics.mean(last_pgd[1::2]))
    md = (tmp_path / "t.md").read_text()
    assert "| all | 97.0 ± 0.0 [97.0, 97.0] |" in md and "co_never: yes" in md
    # one collapsed run breaks two criteria
    bad = runs[0]
    _write(out, bad, [0.6, 0.1], co=True, test={"best": {"epoch": 1, "n": 500, "clean_acc": 0.9, "pgd_acc": 0.6},
                                               "last": {"epoch": 15, "n": 500, "clean_acc": 0.9, "pgd_acc": 0.1}})
    crit = qs.summarize(out, aa_n=500, name="t")["stability"]["criterion"]
    assert crit == {"last_pgd_std_le_0.03": False, "last_within_0.05_of_best": False, "co_never": False}


def test_a_record_of_an_edited_recipe_is_left_out_of_the_summary(tmp_path):
    out = tmp_path / "quickstart_study"
    args = _args(out, seeds=[0])
    test = {"best": {"epoch": 15, "n": 500, "clean_acc": 0.97, "pgd_acc": 0.8},
            "last": {"epoch": 15, "n": 500, "clean_acc": 0.97, "pgd_acc": 0.8}}
    runs = {s["method"]: s for s in qs.specs("compare", args)}
    _write(out, runs["pgd10"], [0.8], test=test)
    old = {**runs["fast_at"], "overrides": [o.replace("lr_max=", "lr_max=9") for o in runs["fast_at"]["overrides"]]}
    _write(out, old, [0.8], test=test)  # Fast-AT's record, trained before its recipe was edited
    tuned = qs.specs("tune", args)[0]
    _write(out, {**tuned, "method": tuned["method"] + "_gone"}, [0.5])  # a candidate the file no longer has
    summary = qs.summarize(out, aa_n=500, name="t")
    assert [r["method"] for r in summary["compare"]] == ["pgd10"]
    assert summary["stale"] == ["quickstart/fast_at_seed0", f"tune/{tuned['method']}_gone_seed0"]
    assert summary["tune"] == [] and "Left out, trained with a recipe" in (tmp_path / "t.md").read_text()


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, "benchmarks/quickstart_study.py", *map(str, args)], capture_output=True,
                          text=True, cwd=str(REPO), timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_tiny_stability_study_runs_and_resumes(tmp_path):
    common = ["stability", "--tiny", "--jobs", "2", "--seeds", "0", "--work", tmp_path / "work", "--out", tmp_path / "json"]
    assert "2 run(s) to train" in _run(common)
    paths = sorted((tmp_path / "json" / "quickstart").glob("*.json"))
    assert [p.name for p in paths] == ["fast_bat_t1_seed0.json", "fast_bat_t2_seed0.json"]
    for p in paths:
        rec = json.loads(p.read_text())
        assert "error" not in rec and rec["test"]["last"]["n"] == 20
    assert "0 run(s) to train" in _run(common)


def test_the_main_jobs_reference_is_the_committed_stability_row():
    from applications.adversarial import reference

    committed = REPO / "benchmarks" / "results" / f"{qs.NAME}.json"
    summary = json.loads(committed.read_text())
    st = summary["stability"]
    ref = reference.QUICKSTART
    assert ref["config_sha256"] == summary["config_sha256"] == qs.config_digest()  # measured with this config
    assert ref["runs"] == st["runs"] == 10
    for key in ("last_pgd", "best_pgd", "last_clean", "best_clean"):
        for stat in ("mean", "std", "min", "max"):
            assert ref[key][stat] == pytest.approx(st[key][stat], abs=5e-4), (key, stat)


#: The guide's label of each compared method (docs/adversarial.md, "The quickstart recipe").
GUIDE_LABELS = {"fast_bat_t1": "Fast-BAT (the quickstart)", "fast_at": "Fast-AT (step 0.375, lr 0.2, peak 0.3)",
                "pgd10": "PGD-10-AT (step 0.0375, lr 0.1, 20 epochs, width 24)"}
TUNE_LABELS = {"Fast-BAT": "fast_bat", "Fast-AT": "fast_at", "PGD-10-AT": "pgd10"}


def _guide_rows():
    guide = (REPO / "docs" / "adversarial.md").read_text(encoding="utf-8")
    return [[c.strip() for c in line.split("|")[1:-1]] for line in guide.splitlines() if line.startswith("| ")]


def test_the_guides_round_2_and_3_tables_are_the_committed_tuning():
    """Each row of the guide's round-2 and round-3 tables (method, knob, seed 0, seed 1, mean, chosen) is the
    committed record of that candidate: its validation accuracies, the detector's verdicts and whether it was
    selected."""
    summary = json.loads((REPO / "benchmarks" / "results" / f"{qs.NAME}.json").read_text())
    tune = {(r["method"], r["candidate"]): r for r in summary["tune"]}
    bases = {"round 1's choice": qs.BASE, "round 2's choice": qs.BASE3}
    rows = [c for c in _guide_rows() if len(c) == 6 and c[0] in TUNE_LABELS and (c[1] in bases or c[1].startswith("`+"))]
    method_knobs = {(TUNE_LABELS[c[0]], c[1]) for c in rows}
    assert method_knobs == ({(m, b) for m in qs.BASE for b in bases}
                            | {(m, f"`{k[len(qs.BASE[m]):]}`") for m in qs.BASE for k in qs.ROUND2[m]}
                            | {(m, f"`{k[len(qs.BASE3[m]):]}`") for m in qs.BASE3 for k in qs.ROUND3[m]})
    for c in rows:
        method = TUNE_LABELS[c[0]]
        if c[1] in bases:
            key, rnd = bases[c[1]][method], 2 if c[1] == "round 1's choice" else 3
        else:
            knob = c[1].strip("`")
            rnd = 2 if qs.BASE[method] + knob in qs.ROUND2[method] else 3
            key = (qs.BASE if rnd == 2 else qs.BASE3)[method] + knob
        r = tune[(method, key)]
        cells = [f"{100 * v:.1f}" for v in r["val_robust_last"]] + ["–"] * (2 - len(r["seeds"]))
        for cell, want in zip(c[2:4], cells):
            assert cell.split(" ")[0] == want, (key, c)
        assert sum("(CO)" in cell for cell in c[2:4]) == r["co_runs"], (key, c)  # the seeds where the detector fired
        assert c[4] == (f"{100 * r['score']:.1f}" if len(r["seeds"]) == 2 else ""), (key, c)
        assert (c[5] == "**yes**") == ((qs.BASE3 if rnd == 2 else qs.SELECTED)[method] == key), (key, c)  # the round's


def test_the_guide_and_the_readme_quote_the_committed_comparison():
    """Every number of the guide's comparison table, and the AutoAttack accuracies the README quotes, are the
    committed summary's (docs quote only committed results)."""
    summary = json.loads((REPO / "benchmarks" / "results" / f"{qs.NAME}.json").read_text())
    rows = {cells[0]: cells[1:] for cells in _guide_rows()}
    readme = (REPO / "README.md").read_text(encoding="utf-8").replace("**", "")  # bold aside
    assert {r["method"] for r in summary["compare"]} == set(GUIDE_LABELS)
    for r in summary["compare"]:
        cells = rows[GUIDE_LABELS[r["method"]]]
        assert cells[0] == ",".join(map(str, r["seeds"])), r["method"]
        for key in ("best_clean", "best_pgd", "best_aa", "last_pgd"):
            assert any(cell.startswith(qs._fmt(r[key])) for cell in cells), (r["method"], key, qs._fmt(r[key]))
        assert f"{r['co_runs']}/{r['runs']}" in cells, r["method"]
        warned = r["aa_warned_seeds"]  # the seeds where AutoAttack's Square check fired, of those that recorded it
        if warned:
            assert any(cell.startswith(f"seed{'s' * (len(warned) > 1)} {', '.join(map(str, warned))} (") for cell in cells)
        elif r["aa_checked"]:
            assert f"none of {r['aa_checked']}" in cells, r["method"]
        aa = r["best_aa"]  # the README quotes each method's AutoAttack accuracy, once every seed has it
        if aa and aa["n"] == len(r["seeds"]):
            assert f"{aa['mean']:.3f} ± {aa['std']:.3f} [{aa['min']:.3f}, {aa['max']:.3f}]" in readme, r["method"]


def test_the_guide_quotes_the_committed_ablation():
    """The guide's sentence on Fast-BAT without its implicit term is the committed ablation record (and the record
    of the recipe it is set against)."""
    summary = json.loads((REPO / "benchmarks" / "results" / f"{qs.NAME}.json").read_text())
    (abl,) = [r for r in summary["ablation"] if (r["method"], r["candidate"]) == ("fast_bat", "lam_inf")]
    (ref,) = [r for r in summary["tune"] if (r["method"], r["candidate"]) == ("fast_bat", qs.SELECTED["fast_bat"])]
    assert abl["seeds"] == ref["seeds"] == [0, 1]
    a, b = (f"{100 * v:.1f}" for v in abl["val_robust_last"])
    c, d = (f"{100 * v:.1f}" for v in ref["val_robust_last"])
    text = " ".join((REPO / "docs" / "adversarial.md").read_text(encoding="utf-8").split())
    assert (f"ended at {a} and {b} on seeds 0 and 1 (mean {100 * abl['score']:.1f}, "
            f"{'stable' if abl['stable'] else 'unstable'}), against {c} and {d} with $\\lambda = 10$.") in text
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"cost nothing on the validation split ({abl['score']:.3f} against {ref['score']:.3f})" in readme
    assert abl["score"] >= ref["score"]
    # "about 40 % cheaper" per epoch than the round-3 candidates with the quickstart's passes, run the same way
    same_passes = [r["s_per_epoch"] for r in summary["tune"] if r["method"] == "fast_bat"
                   and r["candidate"] in (qs.BASE3["fast_bat"] + "+zero_start", qs.BASE3["fast_bat"] + "+zstep37.5")]
    assert len(same_passes) == 2 and 0.35 < 1 - abl["s_per_epoch"] / statistics.mean(same_passes) < 0.45
