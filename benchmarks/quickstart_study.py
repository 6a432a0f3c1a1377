r"""The main job's recipe (``make train``: the quickstart config) studied: tuning, stability, comparison.

Four phases, each a set of runs of the training program's own ``train`` (through
:func:`benchmarks.study_runs.run_one`), all on the embedded MNIST digits at eps 0.3 with the small CNN:

* ``tune`` — every candidate recipe of :data:`CANDIDATES` (Fast-BAT, Fast-AT and PGD-10-AT: the same number
  of candidates each) trained with the final test off on the first tuning seed, then the ``--top`` (3; 2 for
  rounds 1 and 2) best of each method on the other tuning seeds (the same budget for every method; run the phase
  twice, as the second round waits for the first). The candidates come in three rounds: :data:`ROUND1`, a grid of
  attack step x learning rate, and :data:`ROUND2`, one knob at a time (schedule, its peak, epochs, and two
  of the method's own: Fast-BAT's lambda) on round 1's choice :data:`BASE`, and :data:`ROUND3`, one knob at a
  time again (batch size, width, the attack's initialization, one of the method's own) on round 2's choice
  :data:`BASE3`. Candidates are judged on the
  validation split only (PGD-10 on its first 250 images, every epoch), never on test images. A candidate's
  score is the mean over seeds of its last epoch's validation robust accuracy; a candidate is *stable* when
  in every seed the last epoch is within 0.05 of the best one and the catastrophic-overfitting detector
  never fired. :data:`SELECTED` holds the choice per method, :func:`select` of the records (the
  best-scoring stable candidate of those run on every tuning seed). The recipes are in
  :mod:`benchmarks.quickstart_candidates`.
* ``ablation`` — the runs of :data:`ABLATIONS` on the tuning seeds, scored as the candidates: questions about a
  chosen recipe (Fast-BAT without its implicit term), never candidates themselves.
* ``stability`` — the quickstart config as committed (``applications/adversarial/configs/quickstart.yaml``)
  over seeds 0-4 with ``cpu_threads`` 1 and 2 (the thread count changes the order of floating-point
  reductions, a stand-in for another processor's kernels): the final test (PGD-50, step eps/4, on the
  config's ``eval.test_n`` test images) of the best and the last checkpoint. The criterion of the study:
  the last checkpoint's PGD-50 accuracy has a standard deviation <= 0.03, every run's last is within 0.05
  of its best, and the detector never fires.
* ``compare`` — the quickstart (Fast-BAT) and the selected Fast-AT and PGD-10-AT recipes over seeds 0-4
  (``cpu_threads`` 1; Fast-BAT's runs are the stability phase's): clean and PGD-50 accuracy of the best and
  the last checkpoint, and standard AutoAttack on the first ``--aa-n`` (500) test images of each best one.

Resumable: every run writes ``<out>/<phase>/<method>_seed<k>.json`` as it finishes, and a rerun skips a
run whose JSON holds the same specification (which includes the whole configuration the run trains with,
so editing the quickstart config reruns exactly the runs it changes). The summary
``quickstart_study_cpu.json`` / ``.md`` is written at the end of every invocation.

    python benchmarks/quickstart_study.py tune --tune-seeds 0 1 --jobs 2   # twice: the top ones wait for seed 0
    python benchmarks/quickstart_study.py ablation --tune-seeds 0 1 --jobs 2
    python benchmarks/quickstart_study.py stability compare --jobs 2      # the committed study
    python benchmarks/quickstart_study.py --summarize

The numbers the README and the main job quote (:mod:`applications.adversarial.reference`) are this study's
``stability`` row; ``tests/benchmarks/test_quickstart_study.py`` checks that they agree.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks import study_runs  # noqa: E402
from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, write_json  # noqa: E402
from benchmarks.quickstart_candidates import (  # noqa: E402
    ABLATIONS,
    BASE,
    BASE3,
    CANDIDATES,
    ROUND1,
    ROUND2,
    ROUND3,
    SELECTED,
)

__all__ = ["ABLATIONS", "BASE", "BASE3", "CANDIDATES", "PHASES", "ROUND1", "ROUND2", "ROUND3", "SELECTED", "main", "plan",
           "select", "summarize"]

CONFIG = "applications/adversarial/configs/quickstart.yaml"
DEFAULT_OUT = RESULTS_DIR / "quickstart_study"
DEFAULT_WORK = REPO / ".cache" / "quickstart_study_runs"
NAME = "quickstart_study_cpu"
PHASES = ("tune", "ablation", "stability", "compare")
TUNE_SEEDS = (0,)
SEEDS = (0, 1, 2, 3, 4)
THREADS = (1, 2)


_TUNE = ("eval.final_test=false", "cpu_threads=1")  # tuning never looks at the test images

TINY = ("data.n_train=200", "data.n_val=40", "train.epochs=1", "train.batch_size=50", "eval.val_n=20",
        "eval.val_steps=2", "eval.test_n=20", "eval.test_steps=3", "eval.autoattack_n=0",
        "model.options={width: 4, hidden: 16}")


def config_digest() -> str:
    """First 12 hex digits of the SHA-256 of the quickstart config file."""
    return hashlib.sha256((REPO / CONFIG).read_bytes()).hexdigest()[:12]


def _spec(phase: str, method: str, seed: int, overrides: Sequence[str], args: argparse.Namespace) -> Dict[str, Any]:
    overrides = [*overrides, f"seed={seed}", "device=cpu", "eval.autoattack_n=0"]
    if args.tiny:
        overrides += list(TINY)
    return {"setting": phase, "method": method, "seed": seed, "config": CONFIG, "overrides": overrides,
            "resolved": resolved(overrides)}


def resolved(overrides: Sequence[str]) -> Dict[str, Any]:
    """The configuration a run trains with (the quickstart file and ``overrides``), output folder aside: a run's
    specification, so that a finished run counts as done exactly while its configuration is unchanged."""
    from applications.adversarial.config import config_to_dict, load_config

    d = config_to_dict(load_config(REPO / CONFIG, list(overrides)))
    d.pop("output", None)
    return d


def _last_val_robust(path: Path, s: Dict[str, Any]) -> Optional[float]:
    """The last epoch's validation robust accuracy of the finished run ``s`` (None if not finished)."""
    if not study_runs.is_done(path, s):
        return None
    curve = json.loads(path.read_text())["curve"]
    return curve[-1]["val_robust_acc"] if curve else 0.0


def recipe(method: str) -> Tuple[str, ...]:
    """The overrides of the quickstart config that give ``method``'s selected recipe (none for Fast-BAT)."""
    if method == "fast_bat":
        return ()
    if method not in SELECTED:
        raise SystemExit(f"no selected recipe for {method}: run the tune phase and fill SELECTED")
    return CANDIDATES[method][SELECTED[method]]


def run_overrides(setting: str, method: str) -> Optional[Tuple[str, ...]]:
    """The overrides of the quickstart config that the run named ``method`` in ``setting`` trains with (``tune``:
    ``<method>__<candidate>``; ``quickstart``: ``fast_bat_t<threads>``, ``fast_at``, ``pgd10``); None for a name
    this file does not (or no longer) define."""
    if setting == "tune":
        m, _, k = method.partition("__")
        return (*CANDIDATES[m][k], *_TUNE) if k in CANDIDATES.get(m, {}) else None
    if setting == "ablation":
        m, _, k = method.partition("__")
        return (*CANDIDATES[m][SELECTED[m]], *ABLATIONS[m][k], *_TUNE) if k in ABLATIONS.get(m, {}) else None
    if method in {f"fast_bat_t{t}" for t in THREADS}:
        return (f"cpu_threads={method[len('fast_bat_t'):]}",)
    if method in SELECTED and method != "fast_bat":
        return (*recipe(method), "cpu_threads=1")
    return None


def specs(phase: str, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every run of ``phase``."""
    out = []
    if phase == "tune":  # every candidate on the first seed; the other seeds for the top ones of each method
        first = {(m, k): _spec("tune", f"{m}__{k}", args.tune_seeds[0], run_overrides("tune", f"{m}__{k}"), args)
                 for m, cands in CANDIDATES.items() for k in cands}
        out += first.values()
        scores = {mk: _last_val_robust(study_runs.result_path(args.out, s), s) for mk, s in first.items()}
        if None in scores.values():
            return out  # the later seeds wait for every first-seed result (run the phase again)
        for method, cands in CANDIDATES.items():
            top = sorted(cands, key=lambda k: -scores[(method, k)])[:args.top]
            for seed in args.tune_seeds[1:]:
                out += [_spec("tune", f"{method}__{k}", seed, run_overrides("tune", f"{method}__{k}"), args) for k in top]
    elif phase == "ablation":
        out += [_spec("ablation", f"{m}__{k}", seed, run_overrides("ablation", f"{m}__{k}"), args)
                for seed in args.tune_seeds for m, abl in ABLATIONS.items() for k in abl]
    else:
        names = ([f"fast_bat_t{t}" for t in THREADS] if phase == "stability"
                 else ["fast_bat_t1", *(m for m in ("fast_at", "pgd10") if m in SELECTED)])
        out += [_spec("quickstart", name, seed, run_overrides("quickstart", name), args)
                for seed in args.seeds for name in names]
    return out


def plan(phases: Sequence[str], args: argparse.Namespace, finished: bool = False) -> List[Dict[str, Any]]:
    """The runs of ``phases`` still to train (``finished=True``: the finished ones), without duplicates."""
    seen, todo = set(), []
    for phase in phases:
        for s in specs(phase, args):
            key = json.dumps(s, sort_keys=True)
            if getattr(args, "only", None) and not any(fnmatch.fnmatch(s["method"], pat) for pat in args.only):
                continue
            if key not in seen and study_runs.is_done(study_runs.result_path(args.out, s), s) == finished:
                seen.add(key)
                todo.append(s)
    return todo


# ----------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------

def _dist(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    """Mean, sample standard deviation, min and max of the non-None values (fractions, not %)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _fmt(d: Optional[Dict[str, float]], scale: float = 100.0) -> str:
    if d is None:
        return "–"
    if d["n"] == 1:
        return f"{scale * d['mean']:.1f}"
    return f"{scale * d['mean']:.1f} ± {scale * d['std']:.1f} [{scale * d['min']:.1f}, {scale * d['max']:.1f}]"


def _tune_rows(records: List[Dict[str, Any]], setting: str = "tune") -> List[Dict[str, Any]]:
    """One row per candidate (``setting`` ``tune``) or ablation (``ablation``) with a record: its validation
    scores per tuning seed, and whether it was stable."""
    rows = []
    for method, cands in (CANDIDATES if setting == "tune" else ABLATIONS).items():
        for key in cands:
            overrides = run_overrides(setting, f"{method}__{key}")[:-len(_TUNE)]
            rs = [r for r in records if r["spec"]["setting"] == setting and r["spec"]["method"] == f"{method}__{key}"
                  and "error" not in r and r["curve"]]
            if not rs:
                continue
            last = [r["curve"][-1]["val_robust_acc"] for r in rs]
            best = [max(c["val_robust_acc"] for c in r["curve"]) for r in rs]
            rows.append({"method": method, "candidate": key, "overrides": list(overrides),
                         "seeds": [r["spec"]["seed"] for r in rs], "val_robust_last": last, "val_robust_best": best,
                         "val_clean_last": [r["curve"][-1]["val_clean_acc"] for r in rs],
                         "score": statistics.mean(last), "co_runs": sum(r["co_detected"] for r in rs),
                         "max_drop": max(b - v for b, v in zip(best, last)),
                         "stable": all(b - v <= 0.05 for b, v in zip(best, last)) and not any(r["co_detected"] for r in rs),
                         "diverged_runs": sum(bool(r.get("diverged")) for r in rs),
                         "s_per_epoch": statistics.mean(r["s_per_epoch"] for r in rs if r["s_per_epoch"])})
    return rows


def is_current(record: Dict[str, Any], tiny: bool = False) -> bool:
    """Whether a run record was trained with the recipe its name stands for in this file (a candidate's overrides,
    a method's selected recipe, the quickstart config as it is): records of an edited recipe are left out of
    the summary, never reported under a label they did not run with."""
    s = record.get("spec") or {}
    overrides = run_overrides(str(s.get("setting")), str(s.get("method", "")))
    return overrides is not None and s == _spec(str(s["setting"]), str(s["method"]), int(s["seed"]), overrides,
                                                argparse.Namespace(tiny=tiny))


def select(rows: Sequence[Dict[str, Any]]) -> Dict[str, str]:
    """The choice per method from the tuning rows: among the candidates run on the most tuning seeds (the top ones),
    the stable one with the highest score (mean last validation robust accuracy; ties: the earlier candidate)."""
    chosen = {}
    for method in CANDIDATES:
        mine = [r for r in rows if r["method"] == method]
        most = max((len(r["seeds"]) for r in mine), default=0)
        pool = [r for r in mine if len(r["seeds"]) == most and r["stable"]]
        if pool:
            chosen[method] = max(pool, key=lambda r: r["score"])["candidate"]  # max keeps the first of equal scores
    return chosen


def _test_rows(records: List[Dict[str, Any]], method: str, aa_n: int) -> Optional[Dict[str, Any]]:
    rs = [r for r in records if r["spec"]["setting"] == "quickstart" and r["spec"]["method"] == method
          and "error" not in r and "last" in r["test"]]
    if not rs:
        return None
    best = [r["test"]["best"] for r in rs]
    last = [r["test"]["last"] for r in rs]
    aa_runs = [r for r in rs if (r["test"]["best"].get("autoattack") or {}).get("n") == aa_n]
    aa = [r["test"]["best"]["autoattack"] for r in aa_runs]
    checked = [a for a in aa if a.get("warnings") is not None]  # evaluations that recorded AutoAttack's checks
    return {"method": method, "seeds": [r["spec"]["seed"] for r in rs],
            "best_epoch": [r["best_epoch"] for r in rs],
            "best_clean": _dist([b["clean_acc"] for b in best]), "best_pgd": _dist([b["pgd_acc"] for b in best]),
            "last_clean": _dist([v["clean_acc"] for v in last]), "last_pgd": _dist([v["pgd_acc"] for v in last]),
            "best_minus_last_pgd_max": max(b["pgd_acc"] - v["pgd_acc"] for b, v in zip(best, last)),
            "best_aa": _dist([a["aa_acc"] for a in aa]), "aa_n": aa_n if aa else None,
            "aa_seeds": [r["spec"]["seed"] for r in aa_runs],
            "best_pgd_aa_seeds": _dist([r["test"]["best"]["pgd_acc"] for r in aa_runs]),
            "aa_checked": len(checked), "aa_warned_seeds": [r["spec"]["seed"] for r, a in zip(aa_runs, aa) if a.get("warnings")],
            "co_runs": sum(r["co_detected"] for r in rs), "runs": len(rs),
            "s_per_epoch": statistics.mean(r["s_per_epoch"] for r in rs),
            "wall_time_s": _dist([r["wall_time_s"] for r in rs])}


def summarize(out: Path, aa_n: int, name: str = NAME, tiny: bool = False) -> Dict[str, Any]:
    """Aggregate the per-run JSON under ``out`` into ``<name>.json`` / ``.md`` beside ``out`` (current records only:
    :func:`is_current`; the others are listed as ``stale``)."""
    everything = study_runs.load_records(out)
    records = [r for r in everything if is_current(r, tiny)]
    stale = sorted(f"{r['spec']['setting']}/{r['spec']['method']}_seed{r['spec']['seed']}" for r in everything
                   if r not in records and isinstance(r.get("spec"), dict))
    stab = [r for r in records if r["spec"]["setting"] == "quickstart" and r["spec"]["method"].startswith("fast_bat_t")
            and "error" not in r and "last" in r["test"]]
    stability = None
    if stab:
        rows = {m: _test_rows(records, m, aa_n) for m in (f"fast_bat_t{t}" for t in THREADS)}
        last_pgd = _dist([r["test"]["last"]["pgd_acc"] for r in stab])
        gap = max(r["test"]["best"]["pgd_acc"] - r["test"]["last"]["pgd_acc"] for r in stab)
        co = sum(r["co_detected"] for r in stab)
        stability = {"runs": len(stab), "by_threads": rows,
                     "best_clean": _dist([r["test"]["best"]["clean_acc"] for r in stab]),
                     "best_pgd": _dist([r["test"]["best"]["pgd_acc"] for r in stab]),
                     "last_clean": _dist([r["test"]["last"]["clean_acc"] for r in stab]),
                     "last_pgd": last_pgd, "best_minus_last_pgd_max": gap, "co_runs": co,
                     "wall_time_s": _dist([r["wall_time_s"] for r in stab]),
                     "criterion": {"last_pgd_std_le_0.03": last_pgd["std"] <= 0.03, "last_within_0.05_of_best": gap <= 0.05,
                                   "co_never": co == 0}}
    tune = _tune_rows(records)
    compare = [row for row in (_test_rows(records, m, aa_n) for m in ("fast_bat_t1", "fast_at", "pgd10")) if row]
    summary = {"machine": machine_info("cpu"), "config": CONFIG, "config_sha256": config_digest(),
               "selected": SELECTED, "tune": tune, "selected_by_records": select(tune),
               "ablation": _tune_rows(records, "ablation"), "stability": stability,
               "compare": compare, "stale": stale,
               "runs": len(records), "run_wall_time_s_total": sum(r.get("wall_time_s", 0.0) for r in records
                                                                  if "error" not in r)}
    write_json(out.parent / f"{name}.json", summary)
    (out.parent / f"{name}.md").write_text(markdown(summary), encoding="utf-8")
    return summary


def _warned(row: Dict[str, Any]) -> str:
    if not row.get("aa_checked"):
        return "–"
    seeds = row["aa_warned_seeds"]
    return f"{len(seeds)}/{row['aa_checked']}" + (f" (seed {','.join(map(str, seeds))})" if seeds else "")


LABELS = {"fast_bat_t1": "Fast-BAT (quickstart)", "fast_at": "Fast-AT", "pgd10": "PGD-10-AT"}


def markdown(summary: Dict[str, Any]) -> str:
    lines = [f"# The quickstart recipe studied ({summary['runs']} runs)", "",
             f"Config `{summary['config']}` (sha256 {summary['config_sha256']}…); accuracies in %, mean ± std "
             "[min, max] over the runs; PGD-50: step eps/4, 1 restart, on the config's test images; "
             f"sum of run wall times {summary['run_wall_time_s_total'] / 60:.0f} min on "
             f"{summary['machine']['cpu_model']}.", ""]
    if summary["tune"]:
        lines += ["## Tuning (validation split only: PGD-10 on 250 validation images)", ""]
        lines.append(markdown_table(
            ["method", "candidate", "overrides", "last val robust per seed", "score", "max drop", "CO", "stable",
             "selected", "s/epoch"],
            [[r["method"], r["candidate"], " ".join(r["overrides"]), ", ".join(f"{100 * v:.1f}" for v in r["val_robust_last"]),
              f"{100 * r['score']:.1f}", f"{100 * r['max_drop']:.1f}", r["co_runs"], "yes" if r["stable"] else "no",
              "**yes**" if summary["selected"].get(r["method"]) == r["candidate"] else "",
              f"{r['s_per_epoch']:.1f}"] for r in summary["tune"]]))
        by_records = summary["selected_by_records"]
        lines += ["", "Chosen by the records (the best stable candidate run on every tuning seed): "
                  + ", ".join(f"{m} {k}" for m, k in by_records.items())
                  + ("." if by_records == summary["selected"] else
                     f"; SELECTED differs ({summary['selected']}): update it and rerun the comparison."), ""]
    if summary.get("ablation"):
        lines += ["## Ablations of the chosen recipes (validation split, scored as the tuning; never selected)", "",
                  markdown_table(["method", "ablation", "overrides", "last val robust per seed", "score", "max drop",
                                  "CO", "s/epoch"],
                                 [[r["method"], r["candidate"], " ".join(r["overrides"]),
                                   ", ".join(f"{100 * v:.1f}" for v in r["val_robust_last"]), f"{100 * r['score']:.1f}",
                                   f"{100 * r['max_drop']:.1f}", r["co_runs"], f"{r['s_per_epoch']:.1f}"]
                                  for r in summary["ablation"]]), ""]
    st = summary["stability"]
    if st:
        crit = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in st["criterion"].items())
        lines += [f"## Stability: seeds 0-4 x cpu_threads 1, 2 ({st['runs']} runs)", "",
                  markdown_table(["", "best clean", "best PGD-50", "last clean", "last PGD-50", "max best - last",
                                  "CO", "wall s"],
                                 [["all", _fmt(st["best_clean"]), _fmt(st["best_pgd"]), _fmt(st["last_clean"]),
                                   _fmt(st["last_pgd"]), f"{100 * st['best_minus_last_pgd_max']:.1f}",
                                   f"{st['co_runs']}/{st['runs']}", _fmt(st["wall_time_s"], 1.0)]]
                                 + [[f"cpu_threads {m[-1]}", _fmt(r["best_clean"]), _fmt(r["best_pgd"]),
                                     _fmt(r["last_clean"]), _fmt(r["last_pgd"]),
                                     f"{100 * r['best_minus_last_pgd_max']:.1f}", f"{r['co_runs']}/{r['runs']}",
                                     _fmt(r["wall_time_s"], 1.0)]
                                    for m, r in st["by_threads"].items() if r]),
                  "", f"Criterion: {crit}.", ""]
    if summary["compare"]:
        lines += ["## Comparison: seeds 0-4, cpu_threads 1", "",
                  markdown_table(["method", "seeds", "best clean", "best PGD-50", "best AutoAttack (seeds)",
                                  "same checkpoints' PGD-50", "AA warned", "last clean", "last PGD-50", "CO", "s/epoch"],
                                 [[LABELS[r["method"]], ",".join(map(str, r["seeds"])), _fmt(r["best_clean"]),
                                   _fmt(r["best_pgd"]),
                                   _fmt(r["best_aa"]) + (f" ({','.join(map(str, r.get('aa_seeds', [])))}; n={r['aa_n']})"
                                                         if r["aa_n"] else ""),
                                   _fmt(r.get("best_pgd_aa_seeds")), _warned(r),
                                   _fmt(r["last_clean"]), _fmt(r["last_pgd"]), f"{r['co_runs']}/{r['runs']}",
                                   f"{r['s_per_epoch']:.1f}"] for r in summary["compare"]]),
                  "", "AA warned: evaluations in which AutoAttack's own checks warned (e.g. Square, a black-box "
                  "attack, finding points the gradient attacks missed), of those that recorded its checks.", ""]
    if summary.get("stale"):
        lines += [f"Left out, trained with a recipe this file no longer names: {', '.join(summary['stale'])}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phases", nargs="*", metavar="PHASE", help=f"phases to run, of {', '.join(PHASES)} (none: only the summary)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--tune-seeds", type=int, nargs="+", default=list(TUNE_SEEDS))
    p.add_argument("--only", nargs="+", default=[], metavar="PATTERN", help="run names to run (globs, e.g. 'fast_bat*')")
    p.add_argument("--top", type=int, default=3, help="candidates per method tuned on the seeds after the first")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (a run with cpu_threads 2 uses two threads)")
    p.add_argument("--aa-n", type=int, default=500, help="test images for AutoAttack (compare phase)")
    p.add_argument("--aa-seeds", type=int, nargs="*", default=list(SEEDS),
                   help="seeds whose best checkpoints get AutoAttack, in this order")
    p.add_argument("--aa-version", default="standard", help="'standard' or a comma-separated list of attacks")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the per-run JSON")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder of the runs' checkpoints")
    p.add_argument("--tiny", action="store_true", help="smoke mode (tiny sizes; numbers mean nothing)")
    p.add_argument("--summarize", action="store_true", help="only write the summary from the existing JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; valid: {', '.join(PHASES)}")
    name = NAME
    if args.tiny:
        name = "quickstart_study_tiny"
        args.aa_version = "apgd-ce"
        if args.work == DEFAULT_WORK:  # smoke runs never touch the study's checkpoints or results
            args.work = DEFAULT_WORK / "tiny"
        if args.out == DEFAULT_OUT:
            args.out = args.work / "tiny_results"
    aa = {"n": args.aa_n, "version": args.aa_version}
    if args.phases and not args.summarize:
        todo = plan(args.phases, args)
        aa_todo = [s for s in (plan(["compare"], args, finished=True) if "compare" in args.phases else [])
                   if s["seed"] in args.aa_seeds and study_runs.needs_autoattack(study_runs.result_path(args.out, s), aa)]
        aa_todo.sort(key=lambda s: args.aa_seeds.index(s["seed"]))  # in the order given (a second invocation can
        # take the seeds from the other end: an evaluation another one has added is not redone)
        compare = {json.dumps(s, sort_keys=True) for s in specs("compare", args)} if "compare" in args.phases else set()
        print(f"{len(todo)} run(s) to train, {args.jobs} at a time", flush=True)
        study_runs.run_pool(todo, aa_todo, aa, args.out, args.work, args.jobs,
                            lambda s: json.dumps(s, sort_keys=True) in compare and s["seed"] in args.aa_seeds)
    summary = summarize(args.out, args.aa_n, name, args.tiny)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
