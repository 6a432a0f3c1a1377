"""Catastrophic overfitting (CO): the failure mode of single-step adversarial training (FGSM-RS, Fast-AT).

Within one epoch the network learns to defeat the single-step attack it is trained on: PGD robust
accuracy on held-out data collapses to ~0 while clean accuracy holds or rises (Wong et al. 2020; the
reason Fast-BAT, GradAlign and N-FGSM exist). The detector watches the per-epoch validation metrics.

Rule. Let ``C*`` be the best validation clean accuracy of the epochs BEFORE epoch t and ``R*`` the best
validation robust accuracy among those of them whose clean accuracy reached ``min_clean_acc`` (the
*reference* epochs: an untrained network's robust accuracy, e.g. 0.11 at clean 0.15 after one epoch,
is chance, not learned robustness, and must not become the level a later drop is measured from).
Epoch t is *collapsed* when all hold:

* a reference epoch exists and ``R* >= min_best_robust_acc`` (robustness had been learned; a run that
  never learns is not CO),
* ``robust_t < drop_ratio * R*`` or ``robust_t <= min_robust_acc`` (robust accuracy collapsed),
* ``clean_t >= clean_ratio * C*`` (clean accuracy held: a global divergence, where both fall, is not CO).

A second signature needs no earlier robustness (a run can overfit from its first epoch, e.g. FGSM
with a large step, and never reach a reference level): on the same batch of training images, the
accuracy under the method's own training attack ``A_t`` and under PGD ``P_t``. Epoch t is also
collapsed when ``A_t >= min_clean_acc`` and ``A_t - P_t >= max_attack_gap``: the network defeats the
attack it is trained on, not a stronger one (the gap monitored by Wong et al. 2020; Kim et al. 2021).

CO is detected once ``patience`` consecutive epochs are collapsed; :attr:`CatastrophicOverfitting.epoch`
records the first epoch of that streak (the onset) and :attr:`~CatastrophicOverfitting.detected_at`
the epoch where it was confirmed. Accuracies are fractions in ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional

__all__ = ["CatastrophicOverfitting", "detect_in_stream"]

_STATE_KEYS = ("detected", "epoch", "detected_at", "best_clean", "best_robust", "best_robust_epoch",
               "streak", "streak_start", "collapse_clean", "collapse_robust")
# added later: absent from older checkpoints, restored as None
_OPTIONAL_STATE_KEYS = ("reference_robust", "reference_robust_epoch", "reference_clean", "signature",
                        "collapse_attack_acc", "collapse_attack_pgd_acc")


@dataclass
class CatastrophicOverfitting:
    """Online CO detector; call :meth:`update` once per validated epoch.

    Options (defaults):
        drop_ratio (0.5): collapse when robust accuracy falls below this fraction of its best so far.
        min_robust_acc (0.02): collapse also when robust accuracy is at or below this absolute floor.
        clean_ratio (0.9): clean accuracy must stay at or above this fraction of its best so far.
        patience (1): consecutive collapsed epochs needed. 1 suits FGSM-RS, whose CO is abrupt and
            permanent; raise it for noisy small validation sets.
        min_best_robust_acc (0.05): the best robust accuracy so far must reach this before a drop counts.
        min_clean_acc (0.5): an epoch becomes a robust-accuracy reference (may set the best robust
            accuracy ``R*``) only once its clean accuracy is at least this. It keeps the first, still
            untrained epochs (near-chance clean accuracy, with a robust accuracy that is chance too)
            from being the "best" that the next epochs are flagged against. 0.5 suits 10-class
            tasks where adversarial training reaches 0.7-0.9 clean accuracy (MNIST, digits,
            CIFAR-10); lower it for harder tasks (CIFAR-100, ~0.5 clean), 0 restores the rule without it.
        max_attack_gap (0.5): an epoch is also collapsed when, on the same training images, accuracy
            under the training attack is at least ``min_clean_acc`` and exceeds accuracy under PGD by at
            least this (the gap signature; only when :meth:`update` gets both accuracies).

    After a detection, ``reference_robust`` / ``reference_robust_epoch`` / ``reference_clean`` keep the
    best accuracies as they were before the drop (``best_*`` go on tracking later epochs).
    """

    drop_ratio: float = 0.5
    min_robust_acc: float = 0.02
    clean_ratio: float = 0.9
    patience: int = 1
    min_best_robust_acc: float = 0.05
    min_clean_acc: float = 0.5
    max_attack_gap: float = 0.5

    detected: bool = field(default=False, init=False)
    epoch: Optional[int] = field(default=None, init=False)
    detected_at: Optional[int] = field(default=None, init=False)
    best_clean: Optional[float] = field(default=None, init=False)
    best_robust: Optional[float] = field(default=None, init=False)
    best_robust_epoch: Optional[int] = field(default=None, init=False)
    streak: int = field(default=0, init=False)
    streak_start: Optional[int] = field(default=None, init=False)
    collapse_clean: Optional[float] = field(default=None, init=False)
    collapse_robust: Optional[float] = field(default=None, init=False)
    reference_robust: Optional[float] = field(default=None, init=False)
    reference_robust_epoch: Optional[int] = field(default=None, init=False)
    reference_clean: Optional[float] = field(default=None, init=False)
    signature: Optional[str] = field(default=None, init=False)  # "drop" or "gap": the rule that detected CO
    collapse_attack_acc: Optional[float] = field(default=None, init=False)
    collapse_attack_pgd_acc: Optional[float] = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.drop_ratio <= 1.0:
            raise ValueError(f"drop_ratio must be in (0, 1], got {self.drop_ratio}")
        if not 0.0 <= self.min_robust_acc < 1.0:
            raise ValueError(f"min_robust_acc must be in [0, 1), got {self.min_robust_acc}")
        if not 0.0 <= self.clean_ratio <= 1.0:
            raise ValueError(f"clean_ratio must be in [0, 1], got {self.clean_ratio}")
        if int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience}")
        if not 0.0 <= self.min_best_robust_acc <= 1.0:
            raise ValueError(f"min_best_robust_acc must be in [0, 1], got {self.min_best_robust_acc}")
        if isinstance(self.min_clean_acc, bool) or not isinstance(self.min_clean_acc, (int, float)) \
                or not 0.0 <= self.min_clean_acc <= 1.0:
            raise ValueError(f"min_clean_acc must be a number in [0, 1], got {self.min_clean_acc!r}")
        if isinstance(self.max_attack_gap, bool) or not isinstance(self.max_attack_gap, (int, float)) \
                or not 0.0 < self.max_attack_gap <= 1.0:
            raise ValueError(f"max_attack_gap must be a number in (0, 1], got {self.max_attack_gap!r}")

    @staticmethod
    def _check(name: str, value: float) -> float:
        value = float(value)
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be a finite fraction in [0, 1] (not a percentage)")
        return value

    def is_collapsed(self, clean_acc: float, robust_acc: float) -> bool:
        """Whether an epoch with these accuracies is collapsed relative to the bests so far (no state change)."""
        if self.best_robust is None or self.best_clean is None or self.best_robust < self.min_best_robust_acc:
            return False
        robust_drop = robust_acc < self.drop_ratio * self.best_robust or robust_acc <= self.min_robust_acc
        return robust_drop and clean_acc >= self.clean_ratio * self.best_clean

    def has_gap(self, attack_acc: Optional[float], attack_pgd_acc: Optional[float]) -> bool:
        """Whether accuracies under the training attack and under PGD (same images) show the gap signature."""
        if attack_acc is None or attack_pgd_acc is None:
            return False
        return attack_acc >= self.min_clean_acc and attack_acc - attack_pgd_acc >= self.max_attack_gap

    def update(self, epoch: int, clean_acc: float, robust_acc: float, attack_acc: Optional[float] = None,
               attack_pgd_acc: Optional[float] = None) -> bool:
        """Record epoch ``epoch``'s validation accuracies (and, optionally, the accuracies under the
        training attack and under PGD on one batch of training images); True when CO is detected
        (confirmed) at this epoch.

        Returns True at every epoch where ``patience`` consecutive collapsed epochs end; the first such
        event sets :attr:`detected`, :attr:`epoch` (onset) and :attr:`detected_at`, which then stay fixed.
        To act once: ``if co.update(e, c, r) and co.detected_at == e: ...``.
        """
        clean_acc = self._check("clean_acc", clean_acc)
        robust_acc = self._check("robust_acc", robust_acc)
        if attack_acc is not None:
            attack_acc = self._check("attack_acc", attack_acc)
        if attack_pgd_acc is not None:
            attack_pgd_acc = self._check("attack_pgd_acc", attack_pgd_acc)
        epoch = int(epoch)
        drop = self.is_collapsed(clean_acc, robust_acc)
        gap = self.has_gap(attack_acc, attack_pgd_acc)
        if drop or gap:
            if self.streak == 0:
                self.streak_start = epoch
            self.streak += 1
        else:
            self.streak, self.streak_start = 0, None
        fired = self.streak >= self.patience
        if fired and not self.detected:
            self.detected, self.epoch, self.detected_at = True, self.streak_start, epoch
            self.collapse_clean, self.collapse_robust = clean_acc, robust_acc
            self.reference_robust, self.reference_robust_epoch = self.best_robust, self.best_robust_epoch
            self.reference_clean = self.best_clean
            self.signature = "drop" if drop else "gap"
            self.collapse_attack_acc, self.collapse_attack_pgd_acc = attack_acc, attack_pgd_acc
        if self.best_clean is None or clean_acc > self.best_clean:
            self.best_clean = clean_acc
        if clean_acc >= self.min_clean_acc and (self.best_robust is None or robust_acc > self.best_robust):
            self.best_robust, self.best_robust_epoch = robust_acc, epoch
        return fired

    def message(self) -> str:
        """One line for the log."""
        if not self.detected:
            return "no catastrophic overfitting detected"
        if self.signature == "gap":
            a, p = float(self.collapse_attack_acc), float(self.collapse_attack_pgd_acc)
            return (f"catastrophic overfitting at epoch {self.epoch} (confirmed at epoch {self.detected_at}): on "
                    f"training images the training attack leaves accuracy {a:.4f} but PGD leaves {p:.4f} (gap "
                    f"{a - p:.4f} >= {self.max_attack_gap:g}): the network defeats its training attack only; "
                    f"validation robust accuracy {self.collapse_robust:.4f} at clean {self.collapse_clean:.4f}")
        robust = self.best_robust if self.reference_robust is None else self.reference_robust
        robust_epoch = self.best_robust_epoch if self.reference_robust is None else self.reference_robust_epoch
        clean = self.best_clean if self.reference_clean is None else self.reference_clean
        return (f"catastrophic overfitting at epoch {self.epoch} (confirmed at epoch {self.detected_at}): "
                f"validation robust accuracy {self.collapse_robust:.4f} vs best {robust:.4f} "
                f"(epoch {robust_epoch}) before the drop, while clean accuracy is {self.collapse_clean:.4f} "
                f"(best before {clean:.4f}); keep the best-robust checkpoint")

    def state_dict(self) -> Dict[str, Any]:
        """Detector state (plain Python values) plus its options, for checkpoints."""
        state = {k: getattr(self, k) for k in _STATE_KEYS + _OPTIONAL_STATE_KEYS}
        state["options"] = {"drop_ratio": self.drop_ratio, "min_robust_acc": self.min_robust_acc,
                            "clean_ratio": self.clean_ratio, "patience": self.patience,
                            "min_best_robust_acc": self.min_best_robust_acc, "min_clean_acc": self.min_clean_acc,
                            "max_attack_gap": self.max_attack_gap}
        return state

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore the state from :meth:`state_dict` (the options of ``self`` are kept).

        Raises:
            ValueError: a state key is missing.
        """
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise ValueError(f"CatastrophicOverfitting state lacks keys {missing}")
        for k in _STATE_KEYS:
            setattr(self, k, d[k])
        for k in _OPTIONAL_STATE_KEYS:
            setattr(self, k, d.get(k))


def detect_in_stream(records: Iterable[Mapping[str, Any]], **options: Any) -> Optional[int]:
    """Post-hoc CO detection on a ``metrics.jsonl`` stream; the onset epoch, or None.

    Records without both ``val_clean_acc`` and ``val_robust_acc`` (per-step or test records, epochs
    without validation) are skipped; ``epoch`` defaults to the record's position among validated ones.
    ``options`` go to :class:`CatastrophicOverfitting`.
    """
    detector = CatastrophicOverfitting(**options)
    i = 0
    for rec in records:
        clean, robust = rec.get("val_clean_acc"), rec.get("val_robust_acc")
        if clean is None or robust is None:
            continue
        detector.update(int(rec.get("epoch", i)), clean, robust)
        i += 1
        if detector.detected:
            break
    return detector.epoch
