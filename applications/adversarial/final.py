"""The end of a training run: the final test of the best and the last checkpoint (PGD, and standard
AutoAttack on the best one with ``eval.autoattack_n``), written to ``results.json``."""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from torch import nn

from applications.common import checkpoint as ckpt_lib
from applications.common.atomic import write_json

from . import distributed as dist_lib
from .evaluation import autoattack_accuracy, evaluate_robust, format_table
from .seeds import Stream, mix_seed

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["autoattack", "final_evaluation"]


def autoattack(tr: Trainer, model: nn.Module, entry: Dict[str, Any]) -> None:
    """Standard AutoAttack on the first ``eval.autoattack_n`` test images, in the main process only
    (the other ranks wait at the closing barrier: keep ``n`` within the process group's timeout),
    recorded in ``entry`` and printed. An error is logged and recorded, not raised: the PGD results
    are already saved."""
    cfg = tr.cfg
    n = min(int(cfg.eval.autoattack_n), len(tr.data.test))
    t0 = time.perf_counter()
    try:
        r = autoattack_accuracy(model, tr.data.test.x[:n], tr.data.test.y[:n], cfg.eps,
                                batch_size=cfg.eval.batch_size, seed=cfg.seed)
    except Exception as exc:  # noqa: BLE001 - the run's results must survive a failed extra evaluation
        entry["autoattack_error"] = f"{type(exc).__name__}: {exc}"[:500]
        tr.log(f"WARNING: AutoAttack failed ({entry['autoattack_error']}); the PGD results are saved")
        return
    entry.update({"autoattack_acc": r["robust_acc"], "autoattack_n": r["n"],
                  "autoattack_time_s": time.perf_counter() - t0, "autoattack_per_attack": r["per_attack"],
                  "autoattack_warnings": r["warnings"]})
    tr.log(f"test (standard AutoAttack, eps {cfg.eps:.5g}): best checkpoint, first {r['n']} test images: "
             f"robust_acc {r['robust_acc']:.4f} (clean {r['clean_acc']:.4f})")
    for msg in r["warnings"]:  # AutoAttack's own checks: its number may overstate the robustness
        tr.log(f"WARNING: AutoAttack's check: {msg}")


def final_evaluation(tr: Trainer, train_time: float, wall: float) -> Dict[str, Any]:
    """The final test of the best and the last checkpoint (and AutoAttack), written to results.json and returned."""
    cfg, ctx = tr.cfg, tr.ctx
    test: Dict[str, Any] = {}
    best_model: Optional[nn.Module] = None
    attack = (f"PGD-{cfg.eval.test_steps}-{cfg.eval.test_restarts}, step "
              f"{'eps/4' if cfg.eval.test_step_size is None else cfg.eval.test_step_size}")
    if cfg.eval.final_test:
        models: List[Tuple[str, nn.Module, Optional[int]]] = []
        best_path = tr.run_dir / "best.pt"
        dist_lib.barrier(ctx)
        if tr.best_epoch is not None and best_path.is_file():
            best = ckpt_lib.load(best_path, map_location=tr.device)
            best_model = copy.deepcopy(tr.model)
            best_model.load_state_dict(best["model"])
            models.append(("best", best_model, int(best["epoch"])))  # the file's own epoch
        models.append(("last", tr.model, tr.epoch))
        for name, model, epoch in models:
            if name == "last" and "best" in test and test["best"]["epoch"] == epoch:
                # the best checkpoint is the last epoch: same weights, same seeded attack, same numbers
                test[name] = {**test["best"], "time_s": 0.0}
                continue
            t0 = time.perf_counter()
            r = evaluate_robust(model, tr.data.test, cfg.eval.test_n, cfg.eps, cfg.eval.test_steps,
                                cfg.eval.test_restarts, cfg.eval.test_step_size, cfg.eval.batch_size,
                                mix_seed(cfg.seed, Stream.TEST), ctx)
            test[name] = {"epoch": epoch, **r, "time_s": time.perf_counter() - t0}
        rows = [[k, v["epoch"], v["n"], v["clean_acc"], v["robust_acc"]] for k, v in test.items()]
        tr.log(f"test ({attack}, eps {cfg.eps:.5g}):\n" + format_table(
            rows, ["checkpoint", "epoch", "n", "clean_acc", "robust_acc"]))
    results = {
        "run_dir": str(tr.run_dir), "method": cfg.method.name, "method_options": tr.method.resolved_options(),
        "seed": cfg.seed, "model": cfg.model.name, "data": cfg.data.name, "eps": cfg.eps,
        "epochs_completed": tr.epoch, "steps": tr.step, "world_size": ctx.world_size,
        "best_epoch": test["best"]["epoch"] if "best" in test else tr.best_epoch,
        "best_val_robust_acc": tr.best_val_robust if tr.best_epoch else None,
        "test_attack": attack, "test": test,
        "catastrophic_overfitting": (None if tr.co is None else
                                     {"detected": tr.co.detected, "epoch": tr.co.epoch,
                                      "message": tr.co.message()}),
        "stopped_early": tr.co_stop, "config_changes": tr.config_changes, "train_time_s": train_time,
        "wall_time_s": wall,
    }
    if ctx.is_main:
        write_json(tr.run_dir / "results.json", results)
        if cfg.eval.autoattack_runs:
            if "best" in test and best_model is not None:
                autoattack(tr, best_model, test["best"])
                write_json(tr.run_dir / "results.json", results)
            else:
                tr.log("note: eval.autoattack_n: no best checkpoint (no validation score), AutoAttack skipped")
    dist_lib.barrier(ctx)  # leave together: a rank tearing down gloo while another still talks aborts it
    return results
