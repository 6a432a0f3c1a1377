"""What a run leaves besides its checkpoints: the per-epoch metrics files, the plot, ``results.json``,
and optionally TensorBoard scalars.

One record per validated epoch (keys :data:`METRIC_FIELDS`) goes to ``metrics.jsonl`` (every key) and
``metrics.csv`` (those fields) through :func:`applications.common.atomic.write_metrics`; both are rewritten
whole from the history after each epoch, so they always agree with the last checkpoint. Every file is
written to a per-process temporary name and renamed. With
``output.tensorboard`` the same numbers go to :class:`TensorBoardScalars`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from applications.common.atomic import temporary_file

__all__ = ["METRIC_FIELDS", "RUN_FILES", "TENSORBOARD_DIR", "TensorBoardScalars", "write_plot"]

#: The columns of metrics.csv.
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_clean_acc", "val_robust_acc", "val_robust_n",
                 "train_attack_acc", "train_pgd_acc", "epoch_time_s", "eval_time_s", "co_collapsed", "is_best")
#: Files of a run directory that a fresh run (``output.overwrite``) removes first.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "plot.png", "results.json", "train.log")
#: Sub-directory of a run that holds its TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"


def write_plot(path: Path, history: List[Dict[str, Any]], title: str) -> None:
    """plot.png: training accuracy (on the method's training inputs), validation clean and robust
    accuracy per epoch; train loss on a second panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the apps extra
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(epochs, [r["train_acc"] for r in history], "o-", label="train (method's inputs)")
    if any(r.get("val_clean_acc") is not None for r in history):
        ax.plot(epochs, [r.get("val_clean_acc") for r in history], "s-", label="val clean")
        ax.plot(epochs, [r.get("val_robust_acc") for r in history], "^-", label="val robust (PGD)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    ax2.plot(epochs, [r["train_loss"] for r in history], "o-", color="C3")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("train loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with temporary_file(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


class TensorBoardScalars:
    """The per-epoch record as TensorBoard scalars (``tensorboard --logdir runs``), at step = epoch.

    Tags: ``train/loss``, ``train/accuracy``, ``train/lr``, ``val/clean_accuracy``, ``val/robust_accuracy``,
    ``co/train_attack_accuracy``, ``co/train_pgd_accuracy``, ``time/epoch_s``, ``time/eval_s``. ``purge_step``
    (a resumed run: the first epoch it trains) hides the events a crashed run wrote for the epochs it
    repeats. Needs the ``tensorboard`` package
    (``torch.utils.tensorboard``).
    """

    TAGS = {"train_loss": "train/loss", "train_acc": "train/accuracy", "lr": "train/lr",
            "val_clean_acc": "val/clean_accuracy", "val_robust_acc": "val/robust_accuracy",
            "train_attack_acc": "co/train_attack_accuracy", "train_pgd_acc": "co/train_pgd_accuracy",
            "epoch_time_s": "time/epoch_s", "eval_time_s": "time/eval_s"}

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # SummaryWriter opens its event file in a writer thread: a directory it cannot write into would fail
        # there with a thread traceback after the command's own one-line error. Probe in this thread first.
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / f".probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add(self, record: Mapping[str, Any]) -> None:
        """Writes the record's numbers at step ``record["epoch"]`` (absent or None values are skipped)."""
        for key, tag in self.TAGS.items():
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(tag, float(value), global_step=int(record["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self.writer.close()
