"""The learning rate of every optimizer step (the schedules a run's ``train.lr_schedule`` names)."""

from __future__ import annotations

import numpy as np

from .config import TrainConfig

__all__ = ["learning_rate"]


def learning_rate(step: int, train: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``.

    cyclic: piecewise linear in ``t = (step + 1) / total_steps``: 0 at t = 0, ``lr_max`` at
    ``t = lr_peak``, 0 at t = 1 (the official schedule, evaluated after each iteration);
    piecewise: ``lr_max * lr_gamma ** #{m in lr_milestones : epoch >= m}`` with ``epoch = step //
    steps_per_epoch`` (0-based); constant: ``lr_max``.
    """
    if train.lr_schedule == "cyclic":
        return float(np.interp((step + 1) / total_steps, [0.0, train.lr_peak, 1.0], [0.0, train.lr_max, 0.0]))
    if train.lr_schedule == "piecewise":
        epoch = step // steps_per_epoch
        return train.lr_max * train.lr_gamma ** sum(1 for m in train.lr_milestones if epoch >= m)
    return train.lr_max
