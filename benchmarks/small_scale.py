r"""Single-step adversarial training compared at CPU scale: every method, 3 seeds, PGD and AutoAttack.

What is trained (one run = one (setting, method, seed)):

* settings: ``mnist`` (the embedded 5,000 MNIST digits, eps 0.3) and ``cifar10_8`` / ``cifar10_16``
  (the CIFAR-10 JPEG image-folder copy, eps 8/255 and 16/255, a training subset), all with the small CNN;
* methods: standard training, Fast-AT (step 1.25 eps, and 2 eps where catastrophic overfitting is known
  to appear), N-FGSM, GradAlign, Fast-BAT with lambda = 1/attack_step (the exact implicit gradient of the
  one-step map), lambda = 10 (the official value), lambda = inf (no implicit gradient), lambda = 10 with
  the forward-difference implicit gradient, and PGD-10-AT as the multi-step reference.

Every run goes through the training program's own ``train`` (the trainer of ``bilevel-train``): per-epoch
validation (PGD-10 on the validation images) selects the best checkpoint and feeds the catastrophic-
overfitting detector; the final test is PGD-50 with ``--restarts`` restarts (step eps/4) on the first
``--test-n`` test images for the best and the last checkpoint. Standard AutoAttack (``pyautoattack``) is
run on the first ``--aa-n`` test images of the best checkpoint of the runs whose seed is in ``--aa-seeds``.

Resumable: each run writes ``<out>/<setting>/<method>_seed<k>.json`` as it finishes; a rerun skips a run
whose JSON exists with the same specification (a changed specification is run again). ``--jobs N`` trains
N runs at once, one CPU thread each. ``summarize`` (run at the end of every invocation) writes
``small_scale_cpu.json`` / ``.md`` (mean +- std over seeds, catastrophic-overfitting counts) and one plot
per setting (validation robust accuracy per epoch, mean over seeds, min-max shaded).

    python benchmarks/small_scale.py --jobs 2                       # the committed study (CPU)
    python benchmarks/small_scale.py --only mnist --seeds 0         # a subset
    python benchmarks/small_scale.py --summarize                    # tables and plots from the JSON only

CIFAR-10 is read from ``--data`` (default ``../shared/data/cifar10-jpg.tar.gz`` beside the checkout); when
it is absent its settings are skipped with a message. ``--tiny`` is the smoke mode of the tests (a few
hundred MNIST digits, one epoch, APGD-CE alone as "AutoAttack"): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, write_json  # noqa: E402
from benchmarks.study_runs import is_done, load_records, needs_autoattack, result_path, run_pool  # noqa: E402

__all__ = ["METHODS", "SETTINGS", "Method", "Setting", "plan", "summarize", "main"]

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
DEFAULT_OUT = RESULTS_DIR / "small_scale"
DEFAULT_WORK = REPO / ".cache" / "small_scale_runs"


@dataclass(frozen=True)
class Setting:
    """A dataset, radius and training recipe shared by every method of the study."""

    key: str
    label: str
    eps: float
    eps_text: str
    overrides: Tuple[str, ...]
    needs_data: bool = False


@dataclass(frozen=True)
class Method:
    """A training method: its label and its config overrides as a function of eps."""

    key: str
    label: str
    overrides: Callable[[Setting], Tuple[str, ...]]


_COMMON = (
    "device=cpu", "cpu_threads=1", "train.batch_size=128", "train.lr_max=0.2", "train.lr_schedule=cyclic",
    "train.momentum=0.9", "train.weight_decay=5e-4", "eval.val_n=250", "eval.val_steps=10", "eval.test_steps=50",
    "co.enabled=true", "co.patience=2", "co.min_best_robust_acc=0.1",
)

SETTINGS: Dict[str, Setting] = {
    "mnist": Setting("mnist", "MNIST (5k embedded digits), eps 0.3, small CNN width 16, 10 epochs", 0.3, "0.3", _COMMON + (
        "data.name=mnist5k", "data.n_val=500", "model.name=small_cnn", "model.options={width: 16}",
        "train.epochs=10")),
    "cifar10_8": Setting("cifar10_8", "CIFAR-10 (JPEG copy, 4k train), eps 8/255, small CNN width 16, 8 epochs",
                         8 / 255, "8/255", _COMMON + (
        "data.name=cifar10", "data.n_val=500", "data.n_train=4000", "data.augmentation={crop: 4, flip: true}",
        "model.name=small_cnn", "model.options={width: 16}", "train.epochs=8"), needs_data=True),
    "cifar10_16": Setting("cifar10_16", "CIFAR-10 (JPEG copy, 4k train), eps 16/255, small CNN width 16, 8 epochs",
                          16 / 255, "16/255", _COMMON + (
        "data.name=cifar10", "data.n_val=500", "data.n_train=4000", "data.augmentation={crop: 4, flip: true}",
        "model.name=small_cnn", "model.options={width: 16}", "train.epochs=8"), needs_data=True),
}


def _eps(s: Setting) -> str:
    return f"method.eps={s.eps_text}"


def _ga_coef(s: Setting) -> Tuple[str, ...]:
    # the published values at 8/255 and 16/255 (Andriushchenko & Flammarion, 2020); none exists for MNIST at
    # 0.3: 2.0, the value of the larger CIFAR radius, untuned
    return () if s.key.startswith("cifar10") else ("method.ga_coef=2.0",)


METHODS: Dict[str, Method] = {m.key: m for m in (
    Method("standard", "Standard", lambda s: ("method.name=standard",)),
    Method("fast_at", "Fast-AT (1.25 eps)", lambda s: ("method.name=fast_at", _eps(s))),
    Method("fast_at_2eps", "Fast-AT (2 eps)", lambda s: ("method.name=fast_at", _eps(s), f"method.step_size={2 * s.eps!r}")),
    Method("n_fgsm", "N-FGSM", lambda s: ("method.name=n_fgsm", _eps(s))),
    Method("grad_align", "GradAlign", lambda s: ("method.name=grad_align", _eps(s), *_ga_coef(s))),
    Method("fast_bat_exact", "Fast-BAT (lambda = 1/step)", lambda s: ("method.name=fast_bat", _eps(s), "method.lam=null")),
    Method("fast_bat", "Fast-BAT (lambda = 10)", lambda s: ("method.name=fast_bat", _eps(s), "method.lam=10")),
    Method("fast_bat_noig", "Fast-BAT (no IG)", lambda s: ("method.name=fast_bat", _eps(s), "method.lam=.inf")),
    Method("fast_bat_fd", "Fast-BAT (lambda = 10, forward-difference IG)",
           lambda s: ("method.name=fast_bat", _eps(s), "method.lam=10", "method.products=forward")),
    Method("pgd10", "PGD-10-AT (step eps/4)", lambda s: ("method.name=pgd", _eps(s), "method.steps=10",
                                                          f"method.step_size={s.eps / 4!r}")),
)}

TINY = ("data.n_train=200", "data.n_val=40", "train.epochs=1", "train.batch_size=50", "eval.val_n=20",
        "eval.val_steps=2", "eval.test_steps=3", "model.options={width: 4, hidden: 16}")


def spec(setting: Setting, method: Method, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Everything that determines a run's result: its overrides and its evaluation."""
    overrides = [*setting.overrides, f"eval.eps={setting.eps_text}", *method.overrides(setting), f"seed={seed}",
                 f"eval.test_n={args.test_n}", f"eval.test_restarts={args.restarts}"]
    if args.tiny:
        overrides += list(TINY)
    if setting.needs_data:
        overrides.append(f"data.path={args.data}")
    return {"setting": setting.key, "method": method.key, "seed": seed, "overrides": overrides}


def aa_spec(args: argparse.Namespace) -> Dict[str, Any]:
    """The AutoAttack evaluation of the best checkpoints: ``{"n", "version"}``."""
    return {"n": args.aa_n, "version": "apgd-ce" if args.tiny else args.aa_version}


def plan(args: argparse.Namespace, finished: bool = False) -> List[Dict[str, Any]]:
    """The runs to do, seed-major (every setting and method of seed 0 first), minus the finished ones
    (``finished=True``: only the finished ones)."""
    todo = []
    for seed in args.seeds:
        for setting in SETTINGS.values():
            if setting.needs_data and not Path(args.data).exists():
                continue
            for method in METHODS.values():
                if args.only and not any(fnmatch.fnmatch(f"{setting.key}/{method.key}", pat)
                                         or fnmatch.fnmatch(setting.key, pat) for pat in args.only):
                    continue
                s = spec(setting, method, seed, args)
                if is_done(result_path(args.out, s), s) == finished:
                    todo.append(s)
    return todo


# ----------------------------------------------------------------------------------------------------------
# Summary: JSON, Markdown, plots
# ----------------------------------------------------------------------------------------------------------

def _autoattack_of(record: Dict[str, Any], aa_filter: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The run's AutoAttack result on its best checkpoint (None if absent or not of ``aa_filter``)."""
    a = record["test"].get("best", {}).get("autoattack")
    if a is None or (aa_filter is not None and {"n": a.get("n"), "version": a.get("version")} != aa_filter):
        return None
    return a


def robustness_lost(record: Dict[str, Any], ratio: float = 0.5, floor: float = 0.05) -> bool:
    """The test-set signature of catastrophic overfitting, independent of the detector's options: the last
    checkpoint's PGD accuracy below ``ratio`` times the best checkpoint's, which reached ``floor``."""
    best, last = record["test"].get("best"), record["test"].get("last")
    if best is None or last is None:
        return False
    return best["pgd_acc"] >= floor and last["pgd_acc"] < ratio * best["pgd_acc"]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def _stat(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _fmt(st: Optional[Dict[str, float]]) -> str:
    if st is None:
        return "–"
    return f"{st['mean']:.1f}" if st["n"] == 1 else f"{st['mean']:.1f} ± {st['std']:.1f}"


def summarize(out: Path, name: str = "small_scale_cpu", plots: bool = True,
              aa_filter: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Aggregate the per-run JSON of ``out`` into ``<name>.json`` / ``.md`` (and plots) next to ``out``;
    ``aa_filter``: count only AutoAttack results of that ``{"n", "version"}``."""
    records = load_records(out)
    rows: List[Dict[str, Any]] = []
    for setting in SETTINGS.values():
        for method in METHODS.values():
            rs = [r for r in records if r["spec"]["setting"] == setting.key and r["spec"]["method"] == method.key
                  and "error" not in r]
            errors = [r for r in records if r["spec"]["setting"] == setting.key and r["spec"]["method"] == method.key
                      and "error" in r]
            if not rs and not errors:
                continue
            aa_runs = [r for r in rs if _autoattack_of(r, aa_filter) is not None]
            aa = [_autoattack_of(r, aa_filter) for r in aa_runs]
            rows.append({
                "setting": setting.key, "method": method.key, "label": method.label,
                "seeds": sorted(r["spec"]["seed"] for r in rs), "failed_seeds": sorted(r["spec"]["seed"] for r in errors),
                "best_clean": _stat([r["test"].get("best", {}).get("clean_acc") for r in rs]),
                "best_pgd": _stat([r["test"].get("best", {}).get("pgd_acc") for r in rs]),
                "last_clean": _stat([r["test"]["last"]["clean_acc"] for r in rs if "last" in r["test"]]),
                "last_pgd": _stat([r["test"]["last"]["pgd_acc"] for r in rs if "last" in r["test"]]),
                "diverged_runs": sum(bool(r.get("diverged")) for r in rs),
                "diverged_epochs": [r["diverged"]["epoch"] for r in rs if r.get("diverged")],
                "best_aa": _stat([a["aa_acc"] for a in aa]), "aa_seeds": [r["spec"]["seed"] for r in aa_runs],
                "best_pgd_aa_seeds": _stat([r["test"]["best"]["pgd_acc"] for r in aa_runs]),
                "aa_version": aa[0]["version"] if aa else None, "aa_n": aa[0]["n"] if aa else None,
                "co_runs": sum(r["co_detected"] for r in rs), "runs": len(rs),
                "lost_runs": sum(robustness_lost(r) for r in rs),
                "s_per_epoch": _mean([r["s_per_epoch"] for r in rs]),
                "wall_time_s": sum(r["wall_time_s"] for r in rs),
            })
    total_wall = sum(r.get("wall_time_s", 0.0) for r in records if "error" not in r)
    summary = {"machine": machine_info("cpu"), "settings": {k: asdict(v) for k, v in SETTINGS.items()},
               "test_attack": next((r["test_attack"] for r in records if r.get("test_attack")), None),
               "runs": len(records), "run_wall_time_s_total": total_wall, "rows": rows}
    write_json(out.parent / f"{name}.json", summary)
    (out.parent / f"{name}.md").write_text(markdown(summary), encoding="utf-8")
    if plots:
        plot_curves(records, out.parent, name)
    return summary


def markdown(summary: Dict[str, Any]) -> str:
    lines = [f"# Single-step adversarial training at CPU scale ({summary['runs']} runs)", "",
             f"Test attack: {summary['test_attack']}; accuracies in %, mean ± std over seeds; AA: standard AutoAttack "
             "on the best checkpoint (the seeds listed), beside the PGD-50 accuracy of the same checkpoints. "
             "CO: runs in which the trainer's catastrophic-overfitting detector fired (patience 2, "
             "min_best_robust_acc 0.1, otherwise its defaults: it needs a validation clean accuracy of 0.5 before "
             "it can fire); "
             "last < best/2: runs whose last checkpoint kept less than half the best one's PGD accuracy (the "
             "test-set signature of catastrophic overfitting); "
             "diverged: runs stopped by a non-finite or exploding loss (their best checkpoint, from before, is "
             "tested; they have no last one). "
             f"Sum of run wall times: {summary['run_wall_time_s_total'] / 60:.0f} min "
             f"({summary['machine']['cpu_model']}, one thread per run).", ""]
    for key, setting in SETTINGS.items():
        rows = [r for r in summary["rows"] if r["setting"] == key]
        if not rows:
            continue
        lines += [f"## {setting.label}", ""]
        table = [[r["label"], ",".join(map(str, r["seeds"])), _fmt(r["best_clean"]), _fmt(r["best_pgd"]),
                  _fmt(r["best_aa"]) + (f" vs {_fmt(r['best_pgd_aa_seeds'])} (seed {','.join(map(str, r['aa_seeds']))})"
                                        if r["aa_seeds"] else ""),
                  _fmt(r["last_clean"]), _fmt(r["last_pgd"]), f"{r['co_runs']}/{r['runs']}",
                  f"{r['lost_runs']}/{r['runs']}",
                  f"{r['diverged_runs']}/{r['runs']}" + (f" (epoch {', '.join(map(str, r['diverged_epochs']))})"
                                                         if r["diverged_runs"] else ""),
                  f"{r['s_per_epoch']:.1f}" if r["s_per_epoch"] else "–"] for r in rows]
        lines.append(markdown_table(["method", "seeds", "best SA", "best PGD-50", "best AA vs PGD-50", "last SA", "last PGD-50",
                                     "CO", "last < best/2", "diverged", "s/epoch"], table))
        failed = [f"{r['label']} (seeds {r['failed_seeds']})" for r in rows if r["failed_seeds"]]
        if failed:
            lines += ["", "Failed runs: " + "; ".join(failed)]
        lines.append("")
    return "\n".join(lines)


#: The two panels of each plot: the baselines, and the Fast-BAT variants beside Fast-AT and PGD-10-AT.
PANELS = (("standard", "fast_at", "fast_at_2eps", "n_fgsm", "grad_align", "pgd10"),
          ("fast_at", "fast_bat_exact", "fast_bat", "fast_bat_noig", "fast_bat_fd", "pgd10"))


def plot_curves(records: List[Dict[str, Any]], folder: Path, name: str) -> List[Path]:
    """One PNG per setting: validation PGD-10 accuracy per epoch, mean over seeds, min-max shaded; two
    panels (:data:`PANELS`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    colors = {key: f"C{i}" for i, key in enumerate(METHODS)}
    paths = []
    for key, setting in SETTINGS.items():
        rs = [r for r in records if r["spec"]["setting"] == key and "error" not in r]
        if not rs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, panel in zip(axes, PANELS):
            for mkey in panel:
                curves = [[c["val_robust_acc"] for c in r["curve"]] for r in rs if r["spec"]["method"] == mkey]
                curves = [c for c in curves if c and None not in c]
                if not curves:
                    continue
                n = max(len(c) for c in curves)  # diverged runs end early: each epoch averages the runs it has
                cols = [[c[i] for c in curves if i < len(c)] for i in range(n)]
                epochs = list(range(1, n + 1))
                ax.plot(epochs, [statistics.mean(v) for v in cols], color=colors[mkey],
                        label=f"{METHODS[mkey].label} ({len(curves)})")
                if len(curves) > 1:
                    ax.fill_between(epochs, [min(v) for v in cols], [max(v) for v in cols], color=colors[mkey],
                                    alpha=0.15)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("validation PGD-10 accuracy")
        fig.suptitle(f"{setting.label}: mean over seeds (count in brackets), min-max shaded", fontsize=9)
        fig.tight_layout()
        path = folder / f"{name}_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                   help="setting or setting/method glob patterns, e.g. mnist 'cifar10_*/fast_*'")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 (image-folder tarball or tree)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the per-run JSON")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder of the runs' checkpoints")
    p.add_argument("--test-n", type=int, default=1000, help="test images for PGD-50 (best and last)")
    p.add_argument("--restarts", type=int, default=1, help="PGD-50 restarts (the paper: 10)")
    p.add_argument("--aa-n", type=int, default=500, help="test images for AutoAttack")
    p.add_argument("--aa-seeds", type=int, nargs="*", default=[0], help="seeds whose best checkpoint gets AutoAttack")
    p.add_argument("--aa-version", default="standard", help="'standard' or a comma-separated list of attacks")
    p.add_argument("--tiny", action="store_true", help="smoke mode (MNIST only, tiny sizes; numbers mean nothing)")
    p.add_argument("--summarize", action="store_true", help="only write the summary from the existing JSON")
    p.add_argument("--name", default=None, help="summary file name (default small_scale_cpu, tiny: small_scale_tiny)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = args.data.expanduser().resolve()
    name = args.name or ("small_scale_tiny" if args.tiny else "small_scale_cpu")
    if args.tiny:
        args.only = args.only or ["mnist/fast_at", "mnist/fast_bat"]
        if args.work == DEFAULT_WORK:  # smoke runs never touch the study's checkpoints or results
            args.work = DEFAULT_WORK / "tiny"
        if args.out == DEFAULT_OUT:
            args.out = args.work / "tiny_results"
    if not args.summarize:
        if not Path(args.data).exists():
            print(f"CIFAR-10 not found at {args.data}: its settings are skipped", file=sys.stderr)
        todo = plan(args)
        aa = aa_spec(args)
        # AutoAttack after every training: the runs of all seeds first, then the seeds of --aa-seeds evaluated
        aa_todo = [s for s in plan(args, finished=True) if s["seed"] in args.aa_seeds
                   and needs_autoattack(result_path(args.out, s), aa)]
        n_aa = len(aa_todo) + sum(s["seed"] in args.aa_seeds for s in todo)
        print(f"{len(todo)} run(s) to train and {n_aa} AutoAttack evaluation(s), {args.jobs} at a time", flush=True)
        run_pool(todo, aa_todo, aa, args.out, args.work, args.jobs, lambda s: s["seed"] in args.aa_seeds)
    summary = summarize(args.out, name, aa_filter=aa_spec(args))
    print(markdown(summary))
    return 0 if not any(r["failed_seeds"] for r in summary["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
