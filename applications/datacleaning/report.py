"""What a data-cleaning run reports: the table of methods, the plot, and the summary numbers.

* ``gap_closed``: :math:`(a - a_{unweighted}) / (a_{oracle} - a_{unweighted})` for a test accuracy :math:`a`.
* ``time_to_target_s``: the training time (evaluation excluded) at the first evaluation whose full
  validation loss is at most the target (``None``: never reached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from applications.common.atomic import temporary_file

__all__ = ["METRIC_FIELDS", "format_table", "summary_row", "time_to_target", "write_plot"]

#: Columns of metrics.csv (one row per evaluation of a method).
METRIC_FIELDS = ("method", "step", "time_s", "val_loss", "test_acc", "auc", "precision", "recall")


def time_to_target(history: List[Mapping[str, Any]], target: Optional[float]) -> Optional[float]:
    """The ``time_s`` of the first record with ``val_loss <= target``, or None."""
    if target is None:
        return None
    return next((r["time_s"] for r in history if r["val_loss"] <= target), None)


def summary_row(name: str, history: List[Mapping[str, Any]], baselines: Mapping[str, Mapping[str, Any]],
                target: Optional[float]) -> Dict[str, Any]:
    """The table row of a method: its last evaluation, the gap closed and the time to the target."""
    last = dict(history[-1])
    row = {"method": name, **{k: last[k] for k in METRIC_FIELDS if k != "method"}}
    lo, hi = baselines.get("unweighted"), baselines.get("oracle")
    if lo is not None and hi is not None and hi["test_acc"] != lo["test_acc"]:
        row["gap_closed"] = (last["test_acc"] - lo["test_acc"]) / (hi["test_acc"] - lo["test_acc"])
    row["time_to_target_s"] = time_to_target(history, target)
    return row


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: List[Mapping[str, Any]], baselines: Mapping[str, Mapping[str, Any]],
                 target: Optional[float]) -> str:
    """A Markdown table: the baselines, then the methods."""
    head = ["method", "steps", "train time (s)", "val loss", "test acc", "gap closed", "ROC-AUC", "precision",
            "recall", f"time to val loss {_cell(target)} (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in baselines.items():
        lines.append(f"| {name} (baseline) | {b['steps']} | {_cell(b['time_s'], 1)} | {_cell(b['val_loss'])} | "
                     f"{_cell(b['test_acc'])} | - | - | - | - | - |")
    for r in rows:
        cells = [r["method"], r["step"], _cell(r["time_s"], 1), _cell(r["val_loss"]), _cell(r["test_acc"]),
                 _cell(r.get("gap_closed"), 2), _cell(r["auc"]), _cell(r["precision"]), _cell(r["recall"]),
                 _cell(r["time_to_target_s"], 1)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def write_plot(path: Path, histories: Mapping[str, List[Mapping[str, Any]]],
               baselines: Mapping[str, Mapping[str, Any]], title: str) -> None:
    """plot.png: full validation loss and weights' ROC-AUC against training time, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the apps extra
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        t = [r["time_s"] for r in hist]
        ax.plot(t, [r["val_loss"] for r in hist], "o-", ms=3, label=name)
        ax2.plot(t, [r["auc"] for r in hist], "o-", ms=3, label=name)
    for i, (name, b) in enumerate(baselines.items()):
        ax.axhline(b["val_loss"], ls="--", color=f"C{7 + i}", lw=1, label=f"{name} (baseline)")
    for a in (ax, ax2):
        a.set_xscale("symlog", linthresh=1.0)
        a.set_xlim(left=0)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    ax2.set_xlabel("training time (s)")
    ax2.set_ylabel('ROC-AUC of the weights for "corrupted"')
    ax2.set_ylim(0.4, 1.0)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    with temporary_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
