r"""One run of a training study, and the process pool that runs many: the machinery shared by
``small_scale.py`` and ``quickstart_study.py``.

A *spec* is a JSON-able dict ``{"setting", "method", "seed", "overrides"}`` (optionally ``"config"``, a config
file relative to the checkout, and any other keys that identify the run). :func:`run_one` trains it through
the training program's own ``train`` (the trainer of ``bilevel-train``: per-epoch validation, best
checkpoint, catastrophic-overfitting detector, final PGD test of the best and the last checkpoint) and
writes ``<out>/<setting>/<method>_seed<k>.json``; the checkpoints stay in ``<work>/<setting>_<method>_seed<k>``.
:func:`autoattack_one` adds standard AutoAttack on the kept best checkpoint to a finished run's JSON.

Resumable: a run counts as done (:func:`is_done`) while its JSON holds the same spec and no error, so a
changed spec is trained again; an AutoAttack evaluation is redone only when its ``{"n", "version"}``
changes (:func:`needs_autoattack`). :func:`run_pool` trains in ``jobs`` spawned processes, queuing each
run's AutoAttack behind the trainings.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.common import write_json  # noqa: E402

__all__ = ["result_path", "is_done", "run_one", "pgd_test", "autoattack_best", "needs_autoattack", "autoattack_one",
           "run_pool", "load_records"]

Spec = Dict[str, Any]


def result_path(out: Path, s: Spec) -> Path:
    """Where the run ``s`` writes its record."""
    return out / s["setting"] / f"{s['method']}_seed{s['seed']}.json"


def is_done(path: Path, s: Spec) -> bool:
    """Whether ``path`` holds a finished, error-free record of exactly the spec ``s``."""
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return old.get("spec") == s and "error" not in old


def run_one(s: Spec, out: Path, work: Path) -> Dict[str, Any]:
    """Train one run in this process (``s["overrides"]`` over ``s["config"]``, a config file relative to the
    checkout, or over the defaults), evaluate it, write its JSON; returns the record. A run that diverges is
    an outcome, not a failure: its record says at which epoch, and its best checkpoint gets the final test."""
    import torch

    from applications.adversarial.config import load_config
    from applications.adversarial.trainer import TrainingDiverged, train

    torch.set_num_threads(1)
    name = f"{s['setting']}_{s['method']}_seed{s['seed']}"
    config = REPO / s["config"] if s.get("config") else None  # a config file under the checkout, else the defaults
    cfg = load_config(config, [*s["overrides"], f"output.dir={work}", f"output.name={name}", "output.overwrite=true"])
    run_dir = work / name
    t0 = time.perf_counter()
    diverged: Optional[Dict[str, Any]] = None
    try:
        res = train(cfg, run_dir=run_dir, progress=False)
    except TrainingDiverged as exc:  # an outcome of the method, not a failure of the study
        diverged = {"epoch": exc.epoch, "message": str(exc).split("; last good")[0]}
        res = {"epochs_completed": exc.epoch - 1, "best_epoch": None, "train_time_s": None, "test": {},
               "test_attack": None, "catastrophic_overfitting": None}
        if (run_dir / "best.pt").is_file():  # the final test the trainer would have run on best.pt
            best = pgd_test(run_dir / "best.pt")
            res["best_epoch"], res["test"] = best["epoch"], {"best": best}
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    co = res.get("catastrophic_overfitting") or {}
    record: Dict[str, Any] = {
        "spec": s,
        "epochs": res["epochs_completed"],
        "best_epoch": res["best_epoch"],
        "s_per_epoch": statistics.mean(h["epoch_time_s"] for h in history) if history else None,
        "train_time_s": res["train_time_s"],
        "wall_time_s": wall,
        "test_attack": res["test_attack"],
        "test": {k: {"epoch": v["epoch"], "n": v["n"], "clean_acc": v["clean_acc"], "pgd_acc": v["robust_acc"],
                     "time_s": v["time_s"]} for k, v in res["test"].items()},
        "co_detected": bool(co.get("detected")),
        "co_epoch": co.get("epoch"),
        "co_message": co.get("message"),
        "diverged": diverged,
        "curve": [{"epoch": h["epoch"], "val_clean_acc": h["val_clean_acc"], "val_robust_acc": h["val_robust_acc"],
                   "train_loss": h["train_loss"]} for h in history],
    }
    path = result_path(out, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def _quiet(*_: Any) -> None:
    pass


def pgd_test(checkpoint: Path) -> Dict[str, Any]:
    """The trainer's final test (same images, same seeded random starts) on a checkpoint, through
    ``bilevel-evaluate``'s :func:`~applications.adversarial.evaluate.evaluate_checkpoint`."""
    from applications.adversarial.evaluate import evaluate_checkpoint
    from applications.common.checkpoint import load

    ev = load(checkpoint, map_location="cpu")["config"]["eval"]
    out = evaluate_checkpoint(checkpoint, ["pgd"], pgd_steps=ev["test_steps"], pgd_restarts=ev["test_restarts"],
                              pgd_step_size=ev["test_step_size"], log=_quiet)
    r = out["results"]["pgd"]
    return {"epoch": out["epoch"], "n": out["n"], "clean_acc": r["clean_acc"], "robust_acc": r["accuracy"],
            "time_s": r["time_s"]}


def autoattack_best(checkpoint: Path, aa: Dict[str, Any]) -> Dict[str, Any]:
    """AutoAttack accuracy of a checkpoint on the first ``aa["n"]`` test images of its dataset (through
    :func:`~applications.adversarial.evaluate.evaluate_checkpoint`; seeded by the run's seed)."""
    from applications.adversarial.evaluate import evaluate_checkpoint

    out = evaluate_checkpoint(checkpoint, ["autoattack"], n=aa["n"], batch_size=500, aa_version=aa["version"],
                              log=_quiet)
    r = out["results"]["autoattack"]
    if r["accuracy"] is None:
        raise ImportError(r["skipped"])
    return {"n": aa["n"], "n_used": out["n"], "version": aa["version"], "clean_acc": r["clean_acc"],
            "aa_acc": r["accuracy"], "per_attack": r.get("per_attack"), "warnings": r.get("warnings"),
            "time_s": r["time_s"]}


def needs_autoattack(path: Path, aa: Dict[str, Any]) -> bool:
    """Whether the finished run at ``path`` lacks the AutoAttack evaluation ``aa`` of its best checkpoint."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    best = record.get("test", {}).get("best")
    if "error" in record or best is None:
        return False
    have = best.get("autoattack") or {}
    return {"n": have.get("n"), "version": have.get("version")} != aa


def autoattack_one(s: Spec, aa: Dict[str, Any], out: Path, work: Path) -> Dict[str, Any]:
    """Add standard AutoAttack on the best checkpoint (kept in ``work``) to a finished run's JSON, unless it has
    that evaluation already (another invocation of the study may have added it since this one was queued)."""
    path = result_path(out, s)
    record = json.loads(path.read_text())
    if not needs_autoattack(path, aa):
        return record
    ckpt = work / f"{s['setting']}_{s['method']}_seed{s['seed']}" / "best.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} is gone: train the run again (delete {path}) to evaluate it")
    record["test"]["best"]["autoattack"] = autoattack_best(ckpt, aa)
    write_json(path, record)
    return record


def _worker(s: Spec, out: str, work: str, aa: Optional[Dict[str, Any]] = None) -> Tuple[Spec, Optional[str], float]:
    t0 = time.perf_counter()
    try:
        if aa is not None:
            autoattack_one(s, aa, Path(out), Path(work))
            return s, None, time.perf_counter() - t0
        run_one(s, Path(out), Path(work))
        return s, None, time.perf_counter() - t0
    except Exception:  # noqa: BLE001 - one failed run must not stop the study; its JSON records the error
        err = traceback.format_exc(limit=8)
        if aa is not None:  # the trained run stays; its AutoAttack is tried again next time
            return s, err, time.perf_counter() - t0
        path = result_path(Path(out), s)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"spec": s, "error": err})
        return s, err, time.perf_counter() - t0


def run_pool(todo: Sequence[Spec], aa_todo: Sequence[Spec], aa: Dict[str, Any], out: Path, work: Path, jobs: int,
             evaluate_after: Callable[[Spec], bool]) -> int:
    """Train ``todo`` and evaluate ``aa_todo`` (finished runs) with AutoAttack ``aa``, ``jobs`` processes at
    once: every training first, in order, the evaluations queued behind them; a training for which
    ``evaluate_after(spec)`` holds gets its evaluation queued when it finishes. Prints one line per job;
    returns the number of failed jobs (a failed training leaves a JSON with its traceback)."""
    t0 = time.perf_counter()
    failed = 0
    with cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_worker, s, str(out), str(work)): "train" for s in todo}
        pending.update({pool.submit(_worker, s, str(out), str(work), aa): "autoattack" for s in aa_todo})
        done_count, total = 0, len(todo) + len(aa_todo) + sum(map(evaluate_after, todo))
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                kind = pending.pop(fut)
                s, err, secs = fut.result()
                done_count += 1
                failed += err is not None
                print(f"[{done_count}/{total}] {kind} {s['setting']}/{s['method']} seed {s['seed']}: "
                      f"{'FAILED' if err else 'done'} in {secs:.0f} s "
                      f"(elapsed {(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
                if err:
                    print(err.strip().splitlines()[-1], flush=True)
                elif kind == "train" and evaluate_after(s):
                    pending[pool.submit(_worker, s, str(out), str(work), aa)] = "autoattack"
    return failed


def load_records(out: Path) -> List[Dict[str, Any]]:
    """Every readable run record under ``out`` (``<setting>/<run>.json``); an unreadable one is skipped with
    a warning."""
    records = []
    for path in sorted(out.glob("*/*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            print(f"warning: unreadable {path}, skipped", file=sys.stderr)
    return records
