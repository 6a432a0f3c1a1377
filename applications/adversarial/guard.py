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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from applications.common import checkpoint as ckpt_lib
from applications.common.errors import Diverged
from applications.common.rundir import RunDirError
from applications.common.yamlfile import read_yaml

from .config import ConfigError, config_from_dict, config_to_dict

__all__ = ["FIXED_ON_RESUME", "RUN_KIND", "TrainingDiverged", "check_config_file", "divergence_reason",
           "resumable_checkpoint", "resume_changes", "stored_config"]

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
    last = Path(run_dir) / "last.pt"
    if last.is_file():
        return last
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
