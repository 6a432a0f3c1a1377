"""A whole data-cleaning run: the data, the baselines, every configured method side by side, the records.

The run directory ``output.dir/<name>`` receives ``state.pt`` (the checkpoint: the config, the baselines
and each method's :meth:`~.runner.MethodRun.state_dict`, rewritten atomically at every evaluation),
``metrics.jsonl`` / ``metrics.csv`` (every evaluation of every method), ``plot.png`` and
``results.json``. Re-running the same config in the same directory resumes: finished methods are kept,
an interrupted one continues from its last evaluation with its samplers' state (``output.overwrite``
starts afresh; a checkpoint of another problem is refused).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from applications.adversarial.checkpoint import check_compatible, load, save_atomic
from applications.adversarial.records import write_json, write_metrics

from .config import Config
from .data import load_cleaning_data
from .methods import Context, build_method
from .models import build_model
from .problem import DataCleaning
from .report import METRIC_FIELDS, format_table, summary_row, write_plot
from .runner import MethodRun, train_fixed_weights

__all__ = ["RUN_FILES", "run_experiment"]

#: The files of a run directory (removed first by ``output.overwrite``).
RUN_FILES = ("state.pt", "metrics.jsonl", "metrics.csv", "plot.png", "results.json")
#: Config keys that must match to resume (with everything under ``model``).
_PROBLEM_KEYS = ("seed", "weighting.name", "weighting.hidden", "data.name", "data.n_train", "data.n_val",
                 "data.n_test", "data.p", "train.batch_size", "train.val_batch_size")


def _machine() -> Dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": load,
            "torch": torch.__version__, "python": platform.python_version()}


def _baselines(cfg: Config, problem: DataCleaning, theta0: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    """Unweighted training on every (noisy) label, and the oracle on the clean samples only."""
    out = {}
    clean = (~problem.data.corrupted).to(problem.data.x_train.dtype)
    for name, weights in (("unweighted", torch.ones_like(clean)), ("oracle", clean)):
        start = time.perf_counter()
        theta = train_fixed_weights(problem, weights, theta0, cfg.train.baseline_steps, cfg.train.batch_size,
                                    cfg.train.baseline_lr, cfg.train.baseline_momentum, cfg.seed + 4)
        out[name] = {"steps": cfg.train.baseline_steps, "time_s": time.perf_counter() - start,
                     "val_loss": float(problem.val_loss(theta)), "test_acc": float(problem.test_accuracy(theta))}
    return out


def run_experiment(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True) -> Dict[str, Any]:
    """Runs (or resumes) the configured methods and baselines; returns the results (also in results.json)."""
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    device = torch.device(cfg.device)
    data = load_cleaning_data(cfg.data.name, cfg.data.path, n_train=cfg.data.n_train, n_val=cfg.data.n_val,
                              n_test=cfg.data.n_test, p=cfg.data.p, seed=cfg.seed,
                              limit_per_class=cfg.data.limit_per_class).to(device)
    model, theta0 = build_model(cfg.model.name, tuple(data.x_train.shape[1:]), data.num_classes, cfg.seed,
                                **cfg.model.options)
    theta0 = {k: v.to(device) for k, v in theta0.items()}
    problem = DataCleaning(data, model, cfg.model.weight_decay, cfg.weighting.build())
    run_dir = Path(cfg.output.dir) / cfg.run_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.pt"
    saved: Dict[str, Any] = {"config": cfg.to_dict(), "baselines": None, "runs": {}}
    if cfg.output.overwrite:
        for f in RUN_FILES:
            (run_dir / f).unlink(missing_ok=True)
    elif state_path.exists():
        previous = load(state_path)
        check_compatible(previous["config"], cfg.to_dict(), extra_keys=_PROBLEM_KEYS)
        saved["baselines"], saved["runs"] = previous["baselines"], previous["runs"]
        log(f"resuming {run_dir} (methods with a checkpoint: {', '.join(saved['runs']) or 'none'})")

    if cfg.baselines and saved["baselines"] is None:
        saved["baselines"] = _baselines(cfg, problem, theta0)
        save_atomic(saved, state_path)
    baselines = saved["baselines"] or {}
    target = cfg.target_val_loss if cfg.target_val_loss is not None else baselines.get("oracle", {}).get("val_loss")

    ctx = Context(problem, cfg.train.batch_size, cfg.train.val_batch_size, cfg.seed)
    histories: Dict[str, Any] = {}

    def records() -> None:
        write_metrics(run_dir, [r for h in histories.values() for r in h], METRIC_FIELDS)

    for entry in cfg.methods:
        run = MethodRun(entry.name, build_method(entry.name, **entry.options), ctx, theta0, cfg.train.outer_lr,
                        cfg.train.w0)
        if entry.name in saved["runs"]:
            run.load_state_dict(saved["runs"][entry.name])
        histories[entry.name] = run.history
        bar = _progress(entry.name, cfg.train.steps, run.step, progress)

        def on_eval(record: Dict[str, Any], run: MethodRun = run, bar: Any = bar) -> None:
            saved["runs"][run.name] = run.state_dict()
            save_atomic(saved, state_path)
            records()
            if bar is not None:
                bar.n = record["step"]
                bar.set_postfix(val_loss=f"{record['val_loss']:.3f}", test_acc=f"{record['test_acc']:.3f}",
                                auc=f"{record['auc']:.3f}")
                bar.refresh()

        run.run(cfg.train.steps, cfg.train.eval_every, cfg.train.time_budget_s, on_eval=on_eval)
        if bar is not None:
            bar.close()

    rows = [summary_row(name, hist, baselines, target) for name, hist in histories.items()]
    rows.sort(key=lambda r: -r["test_acc"])
    table = format_table(rows, baselines, target)
    mwn = ", Meta-Weight-Net" if cfg.weighting.name == "network" else ""
    title = f"{cfg.data.name}, {cfg.model.name}{mwn}, p = {cfg.data.p:g}"
    write_plot(run_dir / "plot.png", histories, baselines, title)
    results = {"config": cfg.to_dict(), "machine": _machine(), "target_val_loss": target, "baselines": baselines,
               "table": rows, "best": rows[0]["method"] if rows else None, "histories": histories}
    write_json(run_dir / "results.json", results)
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
