"""The adversarial trainer's run guard: what may and may not continue a run, kept out of the training loop.

* Divergence (:func:`divergence_reason`, :class:`TrainingDiverged`): a non-finite loss is located at its
  step; a finite blow-up (a loss far above its running level, or huge weights) is found after the epoch,
  before anything of it is saved.
* Resuming (:func:`resumable_checkpoint`, :func:`stored_config`, :func:`check_config_file`,
  :func:`resume_changes`): the checkpoint to continue must be this trainer's (a data-cleaning
  ``state.pt`` is named as such), carry its config, and agree with the run's ``config.yaml`` (a hand edit
  of the file is reported, never silently ignored and overwritten). Keys that define what the run is
  (:data:`FIXED_ON_RESUME`, and everything under ``model``) must not change; every other change (more
  epochs, a lower learning rate, ...) is applied and recorded with the epoch from which it holds.
* The run directory (:func:`check_run_dir`, :func:`open_run_dir`): locked, holding no other run, cleared
  only once the run is ready; and the trainer's state restored from last.pt (:func:`load_resume`) with
  best.pt repaired when a kill fell between the two files of an epoch (:func:`reconcile_best`).

The functions that take the trainer read and set its attributes; they are the trainer's guard, kept
out of its training loop.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional

import torch
import yaml
from torch import Tensor

from applications.common import checkpoint as ckpt_lib
from applications.common.atomic import remove_stale_temporaries, write_metrics, write_text
from applications.common.checkpoint import RUN_KIND_KEY
from applications.common.errors import Diverged
from applications.common.rundir import LOCK_NAME, RunDirError, RunLock
from applications.common.yamlfile import read_yaml

from .config import ConfigError, config_from_dict, config_to_dict
from .records import METRIC_FIELDS, RUN_FILES, TENSORBOARD_DIR, write_plot
from .seeds import Stream, mix_seed

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CHECKPOINT_FORMAT", "FIXED_ON_RESUME", "RUN_KIND", "TrainingDiverged", "check_config_file",
           "check_divergence", "check_run_dir", "divergence_reason", "first_bad_step", "load_resume", "open_run_dir",
           "raise_diverged", "reconcile_best", "resumable_checkpoint", "resume_changes", "save_best", "save_last",
           "stored_config", "write_epoch"]

#: Version of the checkpoint layout written by the trainer.
CHECKPOINT_FORMAT = 1
#: The run kind in this trainer's checkpoints (:data:`applications.common.checkpoint.RUN_KINDS`).
RUN_KIND = "adversarial-training"
#: Keys (besides everything under ``model``) that a resume may not change: they define the run.
FIXED_ON_RESUME = ("seed", "data.name", "data.n_val", "data.n_train", "method.name", "method.eps")
#: Keys whose change on resume is applied without being recorded (they change no result).
_UNRECORDED = ("output.",)


class TrainingDiverged(Diverged):
    """Training diverged at ``epoch`` (1-based); nothing of that epoch was saved. ``last_good`` is the
    checkpoint left intact (None before the first one). A non-finite loss is located at step
    ``step_in_epoch`` of the epoch, global optimizer step ``step`` (1-based); a finite blow-up (``reason``:
    a loss far above its running level, or huge weights) is found at the end of the epoch."""

    def __init__(self, epoch: int, step_in_epoch: Optional[int], step: Optional[int], last_good: Optional[Path],
                 reason: Optional[str] = None, run_dir: Optional[Path] = None) -> None:
        self.epoch, self.step_in_epoch, self.step, self.last_good = epoch, step_in_epoch, step, last_good
        if reason is None:
            head = (f"training diverged: non-finite loss at epoch {epoch}, step {step_in_epoch} (global step {step}); "
                    "stopped without saving")
        else:
            head = f"training diverged at epoch {epoch}: {reason}; the epoch was not saved"
        if last_good is not None:
            where = (f"last good checkpoint: {last_good} (epoch {epoch - 1}). Continue from it with a lower learning "
                     f"rate: --resume {run_dir or last_good.parent} train.lr_max=<smaller>, or check the data")
        else:
            where = "no checkpoint yet (diverged in the first epoch). Lower train.lr_max or check the data"
        super().__init__(f"{head}; {where}.")


def divergence_reason(loss: float, history: Iterable[Mapping[str, Any]], params: List[torch.Tensor],
                      num_classes: int, divergence_factor: float, max_weight: float) -> Optional[str]:
    """Why an epoch of train loss ``loss`` diverged, or None: a loss more than ``divergence_factor`` times
    its running level max(ln K, the lowest loss of the earlier epochs), or a weight of magnitude above
    ``max_weight`` (or non-finite)."""
    floor = math.log(max(int(num_classes), 2))  # the loss of a uniform guess
    level = max(floor, min((r["train_loss"] for r in history), default=floor))
    if not math.isfinite(loss) or loss > divergence_factor * level:
        return (f"train loss {loss:.3g} is more than train.divergence_factor={divergence_factor:g} times its "
                f"running level {level:.3g}")
    biggest = float(torch.stack([p.detach().abs().max() for p in params]).max())
    if not biggest <= max_weight:
        return f"a weight reached {biggest:.3g} (train.max_weight={max_weight:g})"
    return None


def resumable_checkpoint(run_dir: Path) -> Path:
    """``run_dir/last.pt``, the checkpoint ``--resume`` continues from.

    Raises:
        RunDirError: it does not exist (saying whether the run was stopped before its first checkpoint).
    """
    if Path(run_dir).is_file():
        raise RunDirError(f"--resume takes the run directory, not a file: --resume {Path(run_dir).parent}")
    last = Path(run_dir) / "last.pt"
    if last.is_file():
        return last
    if (Path(run_dir) / LOCK_NAME).exists():
        with RunLock(run_dir):  # a run still before its first checkpoint: RunDirBusy names its process
            pass
    if Path(run_dir).is_dir() and any((Path(run_dir) / n).exists() for n in ("config.yaml", "train.log", "best.pt")):
        raise RunDirError(f"cannot resume: {last} does not exist (the run was stopped before its first checkpoint "
                          f"was complete); start it again without --resume (with output.overwrite=true if "
                          f"{Path(run_dir) / 'best.pt'} exists)")
    raise RunDirError(f"cannot resume: {last} does not exist")


def stored_config(run_dir: Path) -> Dict[str, Any]:
    """The config stored in ``run_dir/last.pt``, the base of a resume.

    Raises:
        RunDirError: no last.pt (:func:`resumable_checkpoint`).
        CheckpointError: it is not this trainer's checkpoint (named for what it is) or has no usable config.
    """
    path = resumable_checkpoint(run_dir)
    ck = ckpt_lib.load(path)
    ckpt_lib.check_run_kind(ck, RUN_KIND, path)
    config = ck.get("config")
    if not isinstance(config, dict):
        raise ckpt_lib.CheckpointError(f"{path} stores no config (got {type(config).__name__}); it cannot be "
                                       "resumed. Start a new run instead")
    try:
        config_from_dict(config)
    except ConfigError as exc:
        raise ckpt_lib.CheckpointError(f"{path} stores a config this version cannot use ({exc.problems[0]}); "
                                       "start a new run instead") from None
    return config


def _describe(diffs: List[Any], left: str, right: str) -> str:
    return "; ".join(f"{k}: {left}={a!r} {right}={b!r}" for k, a, b in diffs)


def check_config_file(run_dir: Path, stored: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """``run_dir/config.yaml`` must say what the checkpoint ran with (``stored``) or what this resume will
    run with (``new``: the same overrides again after an interrupted resume). Any other content is a hand
    edit that a resume would ignore and overwrite, so it is refused.

    Raises:
        RunDirError: listing the edited keys and the two ways on.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        edited = config_to_dict(config_from_dict(read_yaml(path)))
    except ConfigError as exc:
        raise RunDirError(f"{path} was edited and is no longer valid ({exc.problems[0]}); --resume reads the config "
                          "stored in last.pt: restore the file, or delete it (it is rewritten from the checkpoint)"
                          ) from None
    diffs = ckpt_lib.differences(stored, edited)
    if not diffs or not ckpt_lib.differences(new, edited):
        return
    overrides = " ".join(f"{k}={b}" for k, _, b in diffs)
    raise RunDirError(f"{path} differs from its checkpoint last.pt ({_describe(diffs, 'checkpoint', 'file')}); "
                      f"--resume does not read the file: pass the changes as overrides (bilevel-train --resume "
                      f"{run_dir} {overrides}), or delete the file to keep the checkpoint's config")


def resume_changes(stored: Mapping[str, Any], new: Mapping[str, Any], epoch: int, run_dir: Path
                   ) -> Dict[str, Any]:
    """The record of a resume after ``epoch`` completed epochs: ``{"after_epoch": epoch, "changes": {key:
    [old, new]}}`` of every key that differs and changes results (``output.*`` does not).

    Raises:
        CheckpointError: a key of :data:`FIXED_ON_RESUME` (or under ``model``) differs; the message lists
            them and says how to start afresh.
    """
    ckpt_lib.check_compatible(stored, new, extra_keys=FIXED_ON_RESUME,
                              fix=f"they define the run: keep them, or start a new run (another output.name, or "
                                  f"output.overwrite=true to replace {run_dir})")
    diffs = ckpt_lib.differences(stored, new, lambda k: not k.startswith(_UNRECORDED), missing=None)
    return {"after_epoch": int(epoch), "changes": {k: [a, b] for k, a, b in diffs}}


# ------------------------------------------------------------------- the run directory and the trainer's state


def check_run_dir(tr: Trainer) -> None:
    """Before anything is loaded: the directory is this process's alone (:class:`RunLock`: a second run
    on it stops here, naming the first one's pid) and can hold this run. Nothing else is written."""
    assert tr.lock is not None
    tr.lock.acquire()
    if tr.lock.took_over is not None:
        tr.notes.append(f"took over the lock of process {tr.lock.took_over}, which no longer runs")
    last, best = tr.run_dir / "last.pt", tr.run_dir / "best.pt"
    if tr.resume:
        resumable_checkpoint(tr.run_dir)
    elif (last.is_file() or best.is_file()) and not tr.cfg.output.overwrite:
        if last.is_file():
            raise RunDirError(f"run directory {tr.run_dir} already holds a checkpoint; resume it with "
                              f"--resume {tr.run_dir}, choose another output.name, or set output.overwrite=true")
        raise RunDirError(f"run directory {tr.run_dir} holds best.pt but no last.pt (it cannot be resumed); "
                          "set output.overwrite=true to start it again, or choose another output.name")
    elif not tr.cfg.output.overwrite:
        _refuse_foreign_records(tr.run_dir, config_to_dict(tr.cfg))


def _refuse_foreign_records(run_dir: Path, config: Mapping[str, Any]) -> None:
    """A new run in a folder without checkpoints may restart the same run stopped before its first checkpoint
    (the same config.yaml, no results), not take over another run's records or a finished run's results."""
    records = sorted([n for n in (*RUN_FILES, "config.yaml") if (run_dir / n).exists()]
                     + [p.name for p in run_dir.glob("eval_*.json")])
    if not records:
        return
    stored = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    same = isinstance(stored, dict) and not ckpt_lib.differences(stored, config, lambda k: not k.startswith(_UNRECORDED))
    finished = [n for n in records if n == "results.json" or n.startswith("eval_")]
    if same and not finished:  # the same run, killed before its first checkpoint was complete
        return
    what = "another run's records" if not same else "a finished run's records"
    raise RunDirError(f"run directory {run_dir} holds {what} ({', '.join(records)}) but no checkpoint; a new run "
                      "would replace them: set output.overwrite=true to do so, or choose another output.name")


def open_run_dir(tr: Trainer) -> None:
    """Once the run is ready to train (data loaded, model built, checkpoint accepted): clears an
    overwritten run, removes temporaries of killed writes, writes config.yaml (a resumed run's keeps
    the checkpoint's config until the first epoch under the new one is saved: :func:`write_epoch`)."""
    if not tr.resume and tr.cfg.output.overwrite:
        for name in RUN_FILES:
            p = tr.run_dir / name
            if p.exists():
                p.unlink()
        for p in tr.run_dir.glob("eval_*.json"):  # evaluations of the replaced checkpoints
            p.unlink()
        shutil.rmtree(tr.run_dir / TENSORBOARD_DIR, ignore_errors=True)
    tr.run_dir.mkdir(parents=True, exist_ok=True)
    for p in remove_stale_temporaries(tr.run_dir):
        tr.notes.append(f"removed {p.name}, left by a write that was killed")
    if not tr.resume:
        _write_config(tr.run_dir, config_to_dict(tr.cfg))
    elif not (tr.run_dir / "config.yaml").is_file():
        _write_config(tr.run_dir, tr.resumed_config)


def _write_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False))


def load_resume(tr: Trainer) -> None:
    """Restores the trainer ``tr`` from ``<run>/last.pt``: the checks of the module docstring, then the
    model, optimizer, counters, history, detector and random generators."""
    path = tr.run_dir / "last.pt"
    ck = ckpt_lib.load(path, map_location="cpu")
    ckpt_lib.check_run_kind(ck, RUN_KIND, path)
    stored = tr.resumed_config = ck.get("config")
    if not isinstance(stored, dict):
        raise ckpt_lib.CheckpointError(f"{path} stores no config; it cannot be resumed")
    new = config_to_dict(tr.cfg)
    check_config_file(tr.run_dir, stored, new)
    change = resume_changes(stored, new, int(ck.get("epoch", 0)), tr.run_dir)
    tr.config_changes = [dict(c) for c in ck.get("config_changes", [])]
    if change["changes"]:
        tr.config_changes.append(change)
        tr.notes.append(f"resumed after epoch {change['after_epoch']} with a changed config (recorded in results.json, "
                          "and in last.pt and config.yaml with the first epoch saved under it): "
                          + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in change["changes"].items()))
    if ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != "last":
        raise ckpt_lib.CheckpointError(f"{path} is not a resumable last-checkpoint of this trainer")
    saved_info = ck.get("data_info") or {}
    diffs = [f"{k}: saved={saved_info[k]!r} new={tr.data.info[k]!r}" for k in ("num_classes", "channels")
             if k in saved_info and saved_info[k] != tr.data.info[k]]
    if diffs:
        raise ckpt_lib.CheckpointError(f"checkpoint {path} is incompatible with the data of data.path="
                                       f"{tr.cfg.data.path} ({'; '.join(diffs)}); resume with the run's data")
    tr.model.load_state_dict(ck["model"])
    tr.optimizer.load_state_dict(ck["optimizer"])
    if tr.scaler is not None and ck.get("scaler"):
        tr.scaler.load_state_dict(ck["scaler"])
    tr.epoch, tr.step = int(ck["epoch"]), int(ck["step"])
    tr.best_val_robust = float(ck["best_val_robust_acc"])
    tr.best_epoch = ck.get("best_epoch")
    tr.history = [dict(r) for r in ck.get("history", [])]
    tr.wall_before = float(ck.get("wall_time_s", sum(r.get("epoch_time_s", 0.0) for r in tr.history)))
    tr.co_stop = bool(ck.get("co_stop", False)) and tr.cfg.co.early_stop  # lifted by co.early_stop=false
    if tr.co is not None and ck.get("co") is not None:
        tr.co.load_state_dict(ck["co"])
    states = ck.get("rng") or []
    saved_world = int(ck.get("world_size", 1))
    if len(states) == tr.ctx.world_size:
        mine = states[tr.ctx.rank]
        ckpt_lib.restore_rng_state(mine["global"])
        gen_state = mine.get("method_gen")
        if gen_state is not None and mine.get("method_gen_device") == tr.device.type:
            tr.method_gen.set_state(gen_state)
        else:
            tr.notes.append("method generator re-seeded (checkpoint from another device type)")
    else:
        tr.notes.append(f"checkpoint written by {saved_world} process(es), resumed with {tr.ctx.world_size}: "
                          "random generators re-seeded (the run will not be bit-identical)")
        tr.method_gen.manual_seed(mix_seed(tr.cfg.seed, Stream.METHOD, 0, tr.epoch))
    tr.history = [r for r in tr.history if r["epoch"] <= tr.epoch]
    tr._resumed_from = path
    reconcile_best(tr, ck)


def reconcile_best(tr: Trainer, ck: Dict[str, Any]) -> None:
    """best.pt agrees with the resumed state. last.pt is written before best.pt, so a kill between
    the two leaves a best epoch that is the last epoch, whose weights are last.pt's: best.pt is written
    again from them. A best.pt of another epoch (older runs wrote best.pt first) is kept, and its own
    epoch and score become the best so far."""
    if tr.best_epoch is None:
        return
    path = tr.run_dir / "best.pt"
    best = ckpt_lib.load(path, map_location="cpu") if path.is_file() else None
    if best is not None and best.get("epoch") == tr.best_epoch:
        return
    if tr.best_epoch == tr.epoch:
        tr._rewrite_best = True
    elif best is not None:
        tr.notes.append(f"best.pt holds epoch {best.get('epoch')}, not the recorded best epoch {tr.best_epoch}: "
                          "kept as the best checkpoint")
        tr.best_epoch = int(best["epoch"])
        tr.best_val_robust = float(best.get("val_score", best.get("val_robust_acc") or 0.0))
    else:
        tr.notes.append(f"best.pt (epoch {tr.best_epoch}) is missing; the next best epoch writes it")
        tr.best_epoch, tr.best_val_robust = None, -1.0


def first_bad_step(tr: Trainer, bad_step: Tensor) -> int:
    """The first global step with a non-finite loss on any rank, or -1 (one host synchronization)."""
    big = torch.iinfo(torch.int64).max
    first = torch.where(bad_step < 0, torch.full_like(bad_step, big), bad_step)
    if tr.ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    v = int(first)
    return -1 if v == big else v


def raise_diverged(tr: Trainer, bad: int, epoch_start_step: int) -> None:
    """Raises :class:`TrainingDiverged` for a non-finite loss at global step ``bad`` (0-based)."""
    last = tr.run_dir / "last.pt"
    raise TrainingDiverged(tr.epoch + 1, bad - epoch_start_step + 1, bad + 1, last if last.is_file() else None)


def check_divergence(tr: Trainer, loss: float) -> None:
    """A finite blow-up (:func:`divergence_reason`) of an epoch of mean train loss ``loss``, checked before
    anything of the epoch is saved."""
    train = tr.cfg.train
    reason = divergence_reason(loss, tr.history, tr.params, int(tr.data.info["num_classes"]),
                               train.divergence_factor, train.max_weight)
    if reason is not None:
        last = tr.run_dir / "last.pt"
        raise TrainingDiverged(tr.epoch + 1, None, None, last if last.is_file() else None, reason=reason,
                               run_dir=tr.run_dir)


def save_last(tr: Trainer, rng: List[Dict[str, Any]]) -> None:
    """last.pt: everything a resume needs (``rng``: every rank's generator states)."""
    ckpt_lib.save_atomic({
        "format": CHECKPOINT_FORMAT, "kind": "last", RUN_KIND_KEY: RUN_KIND, "config": config_to_dict(tr.cfg),
        "data_info": tr.data.info, "epoch": tr.epoch, "step": tr.step, "total_steps": tr.total_steps,
        "model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
        "scaler": tr.scaler.state_dict() if tr.scaler is not None else None,
        "best_val_robust_acc": tr.best_val_robust, "best_epoch": tr.best_epoch,
        "co": tr.co.state_dict() if tr.co is not None else None, "co_stop": tr.co_stop,
        "history": tr.history, "config_changes": tr.config_changes, "rng": rng, "world_size": tr.ctx.world_size,
        "wall_time_s": tr.wall_before + time.perf_counter() - tr.wall0,
    }, tr.run_dir / "last.pt")


def save_best(tr: Trainer, record: Dict[str, Any]) -> None:
    """best.pt: the weights of the best epoch so far (``record``: its metrics)."""
    ckpt_lib.save_atomic({
        "format": CHECKPOINT_FORMAT, "kind": "best", RUN_KIND_KEY: RUN_KIND, "config": config_to_dict(tr.cfg),
        "data_info": tr.data.info, "epoch": tr.epoch, "step": tr.step, "model": tr.model.state_dict(),
        "val_clean_acc": record["val_clean_acc"], "val_robust_acc": record["val_robust_acc"],
        "val_score": tr.best_val_robust,
    }, tr.run_dir / "best.pt")


def write_epoch(tr: Trainer, record: Dict[str, Any], rng: List[Dict[str, Any]]) -> None:
    """Rank 0: the epoch's metrics, plot, scalars, config.yaml, last.pt and (a best epoch) best.pt, in this
    order (:func:`check_config_file` accepts a config.yaml one resume ahead of last.pt; :func:`reconcile_best`
    repairs a kill between the last two)."""
    cfg = tr.cfg
    write_metrics(tr.run_dir, tr.history, METRIC_FIELDS)
    write_plot(tr.run_dir / "plot.png", tr.history, f"{cfg.method.name} / {cfg.model.name} / "
                f"{cfg.data.name}, eps {cfg.eps:.4g}")
    if tr.scalars is not None:
        tr.scalars.add(record)
    _write_config(tr.run_dir, config_to_dict(tr.cfg))  # before last.pt: the file may run ahead, never behind
    save_last(tr, rng)  # then: a kill before best.pt is repaired from last.pt (reconcile_best)
    if record["is_best"]:
        save_best(tr, record)
