"""A whole data-cleaning run: the data, the baselines, every configured method side by side, the records.

The run directory ``output.dir/<name>`` (held by one process at a time: a second run on it exits 2 naming
the first's pid) receives ``state.pt`` (the checkpoint: the config, the baselines and each method's
:meth:`~.runner.MethodRun.state_dict`, rewritten atomically at every evaluation), ``metrics.jsonl`` /
``metrics.csv`` (every evaluation of every method), ``plot.png`` and ``results.json``. Re-running in the
same directory resumes: finished methods are kept, an interrupted one continues from its last
evaluation with its samplers' state (``output.overwrite`` starts afresh). A checkpoint of another
problem (:data:`PROBLEM_KEYS`) or of another application is refused. Nothing is reported under options
it did not run with: each method's run is stored with the options that produced it
(:func:`method_options`), and a method whose options changed, or whose steps exceed the new
``train.steps``, is trained again (said in the output); so are the baselines when theirs changed.

Under ``torchrun --nproc_per_node P`` the run is data-parallel (the same numbers as one process, up to the
order of floating-point sums): rank 0 alone holds the directory and writes every file; a resume restores
every rank from rank 0's checkpoint; ``results.json`` records ``world_size``. A collective that waits more
than :data:`TIMEOUT_S` for another process fails, so a rank that died never leaves the others waiting.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from applications.common.atomic import remove_stale_temporaries, write_json, write_metrics
from applications.common.checkpoint import (
    RUN_KIND_KEY,
    CheckpointError,
    check_compatible,
    check_run_kind,
    differences,
    load,
    save_atomic,
)
from applications.common.config import ConfigError, resolved_options
from applications.common.distributed import DistContext, agree, barrier, cleanup, on_main, setup
from applications.common.rundir import RunLock
from bilevel.stochastic import DataParallel

from .config import Config, MethodEntry, check_world_size
from .data import load_cleaning_data
from .methods import Context, build_method
from .models import build_model
from .problem import DataCleaning
from .report import METRIC_FIELDS, format_table, summary_row, write_plot
from .runner import MethodRun, train_fixed_weights

__all__ = ["PROBLEM_KEYS", "RUN_FILES", "RUN_KIND", "TIMEOUT_S", "baseline_options", "method_options", "run_experiment"]

#: The files of a run directory (removed first by ``output.overwrite``).
RUN_FILES = ("state.pt", "metrics.jsonl", "metrics.csv", "plot.png", "results.json")
#: The run kind in this application's checkpoints (:data:`applications.common.checkpoint.RUN_KINDS`).
RUN_KIND = "datacleaning"
#: How long a collective waits for the other processes under torchrun before the run stops (seconds).
TIMEOUT_S = 600.0
#: Config keys that must match to resume (with everything under ``model``).
PROBLEM_KEYS = ("seed", "dtype", "weighting.name", "weighting.hidden", "data.name", "data.n_train", "data.n_val",
                 "data.n_test", "data.p", "train.batch_size", "train.val_batch_size")


def _machine() -> Dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": load,
            "torch": torch.__version__, "python": platform.python_version()}


def _baselines(cfg: Config, problem: DataCleaning, theta0: Dict[str, torch.Tensor],
               parallel: Optional[DataParallel]) -> Dict[str, Dict[str, Any]]:
    """Unweighted training on every (noisy) label, and the oracle on the clean samples only."""
    out = {}
    clean = (~problem.data.corrupted).to(problem.data.x_train.dtype)
    for name, weights in (("unweighted", torch.ones_like(clean)), ("oracle", clean)):
        start = time.perf_counter()
        theta = train_fixed_weights(problem, weights, theta0, cfg.train.baseline_steps, cfg.train.batch_size,
                                    cfg.train.baseline_lr, cfg.train.baseline_momentum, cfg.seed + 4, parallel)
        out[name] = {"steps": cfg.train.baseline_steps, "time_s": time.perf_counter() - start,
                     "val_loss": float(problem.val_loss(theta)), "test_acc": float(problem.test_accuracy(theta))}
    return out


def method_options(cfg: Config, entry: MethodEntry) -> Dict[str, Any]:
    """Everything besides the problem that a method's numbers depend on: its options, and the outer
    learning rate and initial logit (the method's ``outer_lr`` option wins over ``train.outer_lr``)."""
    return {"options": dict(entry.options), "outer_lr": cfg.train.outer_lr, "w0": cfg.train.w0}


def baseline_options(cfg: Config) -> Dict[str, Any]:
    """What the baselines' numbers depend on besides the problem."""
    t = cfg.train
    return {"steps": t.baseline_steps, "lr": t.baseline_lr, "momentum": t.baseline_momentum}


def _changes(old: Any, new: Any) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in differences(old, new, missing=None))


def _resume(cfg: Config, state_path: Path, saved: Dict[str, Any], log: Callable[[str], None]) -> None:
    """Fills ``saved`` from the checkpoint at ``state_path``, keeping only what the new config would produce."""
    previous = load(state_path)
    check_run_kind(previous, RUN_KIND, state_path)
    old_cfg = previous.get("config")
    if not isinstance(old_cfg, dict):
        raise CheckpointError(f"{state_path} stores no config; set output.overwrite=true to start afresh")
    old_cfg = {"dtype": "float32", **old_cfg}  # checkpoints written before the dtype option ran in float32
    check_compatible(old_cfg, cfg.to_dict(), extra_keys=PROBLEM_KEYS,
                     fix="set output.overwrite=true to start afresh, or choose another output.name")
    old_train = old_cfg.get("train", {})
    stored = previous.get("options") or {  # checkpoints written before the options were stored: the config's
        m["name"]: {"options": {k: v for k, v in m.items() if k != "name"}, "outer_lr": old_train.get("outer_lr"),
                    "w0": old_train.get("w0")} for m in old_cfg.get("methods", [])}
    old_baselines = previous.get("baseline_options") or {
        "steps": old_train.get("baseline_steps"), "lr": old_train.get("baseline_lr"),
        "momentum": old_train.get("baseline_momentum")}
    if previous.get("baselines") is not None:
        if differences(old_baselines, baseline_options(cfg)):
            log(f"baselines: options changed ({_changes(old_baselines, baseline_options(cfg))}): run again")
        else:
            saved["baselines"] = previous["baselines"]
    for name, run_state in previous.get("runs", {}).items():
        entry = next((e for e in cfg.methods if e.name == name), None)
        if entry is None:
            continue  # not in this run's config: not reported, so not kept under its options
        if name not in stored or differences(stored[name], method_options(cfg, entry)):
            log(f"{name}: options changed ({_changes(stored.get(name, {}), method_options(cfg, entry))}): "
                "trained again")
        elif run_state["step"] > cfg.train.steps:
            log(f"{name}: the checkpoint is at step {run_state['step']}, past train.steps={cfg.train.steps}: "
                "trained again")
        else:
            saved["runs"][name] = run_state
            saved["options"][name] = stored[name]


def run_experiment(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True) -> Dict[str, Any]:
    """Runs (or resumes) the configured methods and baselines; returns the results (also in results.json).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every method runs data-parallel over the processes
    (:mod:`.methods`); rank 0 alone holds the run directory, reads and writes the checkpoint, the records
    and ``results.json``, and logs; the other ranks receive the checkpoint's state from it, and every rank
    returns the same results. An error is raised on every rank (rank 0's as itself, the others' as
    :class:`~applications.common.distributed.StoppedElsewhere`).

    Raises:
        RunDirBusy: another process runs in the same directory.
        CheckpointError: the directory's state.pt is of another problem or application.
        ConfigError: a global batch is not divisible by the number of processes.
        MethodDiverged: a method's validation loss became non-finite.
        OSError: a file cannot be written (full disk, read-only directory).
    """
    try:
        ctx = setup(cfg.device, timeout_s=TIMEOUT_S)
    except ValueError as exc:
        raise ConfigError([f"device: {exc}"]) from None
    try:
        with warnings.catch_warnings():
            if not ctx.is_main:  # the state is replicated: rank 0 warns for every rank
                warnings.simplefilter("ignore")
            results = _experiment(cfg, ctx, log if ctx.is_main else _silent, progress and ctx.is_main)
        barrier(ctx)  # no rank leaves the group while another still talks to it (gloo aborts otherwise)
        return results
    finally:
        cleanup(ctx)


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _experiment(cfg: Config, ctx: DistContext, log: Callable[[str], None], progress: bool) -> Dict[str, Any]:
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    check_world_size(cfg, ctx.world_size)
    dtype = getattr(torch, cfg.dtype)
    data = agree(ctx, lambda: load_cleaning_data(
        cfg.data.name, cfg.data.path, n_train=cfg.data.n_train, n_val=cfg.data.n_val, n_test=cfg.data.n_test,
        p=cfg.data.p, seed=cfg.seed, limit_per_class=cfg.data.limit_per_class)).to(ctx.device, dtype)
    model, theta0 = build_model(cfg.model.name, tuple(data.x_train.shape[1:]), data.num_classes, cfg.seed,
                                **cfg.model.options)
    theta0 = {k: v.to(ctx.device, dtype) for k, v in theta0.items()}
    problem = DataCleaning(data, model, cfg.model.weight_decay, cfg.weighting.build())
    if cfg.train.eval_every > cfg.train.steps:
        log(f"note: train.eval_every={cfg.train.eval_every} is more than train.steps={cfg.train.steps}: each method "
            "is evaluated at its start and its end only")
    if ctx.enabled:
        log(f"{ctx.world_size} processes: every global batch is split over them, the estimates averaged")
    run_dir = Path(cfg.output.dir) / cfg.run_name()
    with contextlib.ExitStack() as stack:
        def open_run_dir() -> Dict[str, Any]:
            lock = stack.enter_context(RunLock(run_dir))
            if lock.took_over is not None:
                log(f"note: took over the lock of process {lock.took_over}, which no longer runs")
            for p in remove_stale_temporaries(run_dir):
                log(f"note: removed {p.name}, left by a write that was killed")
            return _saved_state(cfg, run_dir, log)

        saved = on_main(ctx, open_run_dir)  # every rank continues from rank 0's checkpoint
        return _run(cfg, ctx, problem, theta0, run_dir, saved, log, progress)


def _saved_state(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> Dict[str, Any]:
    """What the run starts from: nothing (``output.overwrite`` removes the files), or the checkpoint's usable part."""
    state_path = run_dir / "state.pt"
    saved: Dict[str, Any] = {RUN_KIND_KEY: RUN_KIND, "config": cfg.to_dict(), "baselines": None,
                             "baseline_options": baseline_options(cfg), "runs": {}, "options": {}}
    if cfg.output.overwrite:
        for f in RUN_FILES:
            (run_dir / f).unlink(missing_ok=True)
    elif state_path.exists():
        _resume(cfg, state_path, saved, log)
        log(f"resuming {run_dir} (methods with a checkpoint: {', '.join(saved['runs']) or 'none'})")
    return saved


def _run(cfg: Config, ctx: DistContext, problem: DataCleaning, theta0: Dict[str, torch.Tensor], run_dir: Path,
         saved: Dict[str, Any], log: Callable[[str], None], progress: bool) -> Dict[str, Any]:
    state_path = run_dir / "state.pt"
    parallel = DataParallel() if ctx.enabled else None
    if cfg.baselines and saved["baselines"] is None:
        saved["baselines"] = _baselines(cfg, problem, theta0, parallel)
        on_main(ctx, lambda: save_atomic(saved, state_path))
    baselines = saved["baselines"] or {}
    target = cfg.target_val_loss if cfg.target_val_loss is not None else baselines.get("oracle", {}).get("val_loss")

    mctx = Context(problem, cfg.train.batch_size, cfg.train.val_batch_size, cfg.seed, parallel)
    histories: Dict[str, Any] = {}

    def checkpoint() -> None:
        save_atomic(saved, state_path)
        write_metrics(run_dir, [r for h in histories.values() for r in h], METRIC_FIELDS)

    resolved: Dict[str, Dict[str, Any]] = {}  # every option each method runs with, for results.json
    for entry in cfg.methods:
        method = build_method(entry.name, **entry.options)
        resolved[entry.name] = resolved_options(method)
        run = MethodRun(entry.name, method, mctx, theta0, cfg.train.outer_lr, cfg.train.w0)
        if entry.name in saved["runs"]:
            run.load_state_dict(saved["runs"][entry.name])
        histories[entry.name] = run.history
        bar = _progress(entry.name, cfg.train.steps, run.step, progress)

        def on_eval(record: Dict[str, Any], run: MethodRun = run, bar: Any = bar, entry: MethodEntry = entry) -> None:
            saved["runs"][run.name] = run.state_dict()
            saved["options"][run.name] = method_options(cfg, entry)
            on_main(ctx, checkpoint)
            if bar is not None:
                bar.n = record["step"]
                bar.set_postfix(val_loss=f"{record['val_loss']:.3f}", test_acc=f"{record['test_acc']:.3f}",
                                auc=f"{record['auc']:.3f}")
                bar.refresh()

        try:
            run.run(cfg.train.steps, cfg.train.eval_every, cfg.train.time_budget_s, on_eval=on_eval)
        finally:
            if bar is not None:
                bar.close()

    rows = [summary_row(name, hist, baselines, target) for name, hist in histories.items()]
    rows.sort(key=lambda r: -r["test_acc"])
    table = format_table(rows, baselines, target)
    mwn = ", Meta-Weight-Net" if cfg.weighting.name == "network" else ""
    title = f"{cfg.data.name}, {cfg.model.name}{mwn}, p = {cfg.data.p:g}"
    results = {"config": cfg.to_dict(), "method_options": resolved, "machine": _machine(), "world_size": ctx.world_size,
               "target_val_loss": target, "baselines": baselines, "table": rows,
               "best": rows[0]["method"] if rows else None, "histories": histories}

    def write_results() -> None:
        write_plot(run_dir / "plot.png", histories, baselines, title)
        write_json(run_dir / "results.json", results)

    on_main(ctx, write_results)
    log(table)
    return results


def _progress(name: str, total: int, done: int, enabled: bool) -> Optional[Any]:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the apps extra
        return None
    return tqdm(total=total, initial=done, desc=name, leave=False, dynamic_ncols=True)
