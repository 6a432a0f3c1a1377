r"""Accuracy of a classifier: clean, under PGD with restarts, under AutoAttack; per run, sharded over ranks.

Every evaluation runs the model in eval mode (:class:`EvalMode` restores each submodule's own mode
afterwards) and keeps its counts on the device until one read at the end. The PGD of
:func:`robust_accuracy` is :func:`~applications.adversarial.attacks.pgd_attack`: ``PGD-50-10``, step
``eps/4``, is the paper's evaluation. :func:`evaluate_clean` and :func:`evaluate_robust` are the run's
versions: the first ``n`` images, sharded strided over the ranks of a data-parallel run, reduced, with
random starts that do not depend on the number of ranks; :func:`evaluate_attack_gap` measures the
catastrophic-overfitting signature (training attack vs PGD on the same images).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from applications.vision.data import ImageArrays

from .attacks import Generator, ShardedGenerator, pgd_attack
from .distributed import DistContext, reduce_sum
from .seeds import mix_seed

__all__ = [
    "EvalMode",
    "as_images",
    "autoattack_accuracy",
    "evaluate_attack_gap",
    "evaluate_clean",
    "evaluate_robust",
    "format_table",
    "model_device",
    "robust_accuracy",
]


def as_images(x: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """Images as floats in [0, 1] on ``device``: uint8 ``x`` is divided by 255, floating ``x`` kept."""
    x = x.to(device) if device is not None else x
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"robust_accuracy: images must be uint8 or floating point in [0, 1], got {x.dtype}")
    return x


class EvalMode:
    """Put every submodule in eval mode and restore each one's previous mode on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: List[bool] = []

    def __enter__(self) -> nn.Module:
        self.modes = [m.training for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, mode in zip(self.model.modules(), self.modes):
            m.training = mode


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def robust_accuracy(model: nn.Module, x_all: Tensor, y_all: Tensor, eps: float, steps: int = 50, restarts: int = 10,
                    step_size: Optional[float] = None, batch_size: int = 200, device: Optional[torch.device] = None,
                    generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    r"""Clean and PGD-``steps``-``restarts`` robust accuracy of ``model`` on ``(x_all, y_all)``.

    Runs in eval mode (every submodule's previous mode is restored), batch by batch, with gradients
    only for the attack's input gradients. The counts stay on the device; the one host synchronization
    is at the end. ``PGD-50-10`` (the default) is the paper's evaluation; a cheap monitoring variant is
    e.g. ``steps=10, restarts=1``.

    Args:
        x_all: images (N, C, H, W), uint8 in [0, 255] or floating point in [0, 1], on any device.
        y_all: labels (N,).
        eps, steps, restarts, step_size, generator: as in :func:`pgd_attack`.
        batch_size: images per attack batch.
        device: where to run; ``None`` means the model's device.

    Returns:
        ``{"clean_acc": float, "robust_acc": float, "n": int}`` (accuracies in [0, 1]).
    """
    if x_all.ndim < 2 or x_all.shape[0] != y_all.shape[0]:
        raise ValueError(f"robust_accuracy: x_all {tuple(x_all.shape)} and y_all {tuple(y_all.shape)} disagree on N")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"robust_accuracy: batch_size must be a positive integer, got {batch_size}")
    n = int(x_all.shape[0])
    if n == 0:
        raise ValueError("robust_accuracy: no samples")
    device = torch.device(device) if device is not None else model_device(model)
    clean = torch.zeros((), dtype=torch.long, device=device)
    robust = torch.zeros((), dtype=torch.long, device=device)
    with EvalMode(model), torch.no_grad():
        for start in range(0, n, int(batch_size)):
            x = as_images(x_all[start:start + batch_size], device)
            y = y_all[start:start + batch_size].to(device)
            clean += (model(x).argmax(dim=1) == y).sum()
            delta = pgd_attack(model, x, y, eps, steps, step_size=step_size, restarts=restarts, generator=generator)
            robust += (model(x + delta).argmax(dim=1) == y).sum()
    return {"clean_acc": clean.item() / n, "robust_acc": robust.item() / n, "n": n}


logger = logging.getLogger(__name__)


class _AutoAttackLog(logging.Handler):
    """What ``pyautoattack`` only logs: the robust accuracy after each attack (over all images, the attacks
    run in turn on the points still robust) and its warnings, such as Square, a black-box attack, finding
    adversarial examples that the gradient-based attacks missed (a sign of gradient masking)."""

    _AFTER = re.compile(r"robust accuracy after ([A-Za-z0-9-]+): ([0-9.]+)%")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.per_attack: Dict[str, float] = {}
        self.warnings: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        match = self._AFTER.search(msg)
        if match:
            self.per_attack[match.group(1).lower()] = round(float(match.group(2)) / 100, 6)  # as printed: 0.01 %
        elif record.levelno >= logging.WARNING:
            self.warnings.append(msg)


def autoattack_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float,
                        version: Union[str, Sequence[str]] = "standard", batch_size: int = 500, seed: int = 0,
                        device: Optional[torch.device] = None) -> Dict[str, float]:
    r"""Robust accuracy under AutoAttack (L-inf), through ``pyautoattack`` (fra31/auto-attack repackaged).

    ``version="standard"`` is the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) whose numbers
    are comparable to RobustBench and the papers' RA-AA. A list of attack names (e.g.
    ``["apgd-ce", "apgd-t"]``) runs a custom, cheaper subset: do not report that as RA-AA.

    The model is evaluated in eval mode (previous modes restored). ``x`` may be uint8 or float in [0, 1].

    Returns:
        ``{"clean_acc", "robust_acc", "n", "per_attack", "warnings"}``: ``per_attack`` the robust accuracy after
        each attack in the order run (as ``pyautoattack`` reports it, to 0.01 %; it stops once no image is
        left robust), ``warnings`` the checks it
        raised (each also logged here as a warning). An empty ``warnings`` is not a proof of robustness.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'autoattack_accuracy needs the optional package pyautoattack: pip install "bilevel[autoattack]"'
        ) from err
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"autoattack_accuracy: eps must be in (0, 1], got {eps}")
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(version, str):
        if version not in ("standard", "plus", "rand"):
            raise ValueError(f"autoattack_accuracy: version must be 'standard', 'plus', 'rand' or a list of attacks, "
                             f"got {version!r}")
        kwargs: Dict[str, Any] = {"version": version}
    else:
        kwargs = {"version": "custom", "attacks": list(version)}
    images = as_images(x, device)
    labels = y.to(device)
    aa_logger = logging.getLogger("auto-attack")  # pyautoattack's logger
    capture, saved = _AutoAttackLog(), (aa_logger.level, aa_logger.propagate)
    aa_logger.addHandler(capture)
    aa_logger.setLevel(logging.DEBUG)  # its per-attack accuracies are debug records
    aa_logger.propagate = False  # ... which must not reach the application's handlers
    try:
        with EvalMode(model):
            adversary = AutoAttack(model, norm="Linf", eps=float(eps), device=device, seed=int(seed), **kwargs)
            with torch.no_grad():
                clean = torch.zeros((), dtype=torch.long, device=device)
                for start in range(0, images.shape[0], int(batch_size)):
                    clean += (model(images[start:start + batch_size]).argmax(dim=1)
                              == labels[start:start + batch_size]).sum()
            _, y_adv = adversary.run_standard_evaluation(images, labels, batch_size=int(batch_size))
    finally:
        aa_logger.removeHandler(capture)
        aa_logger.setLevel(saved[0])
        aa_logger.propagate = saved[1]
    for msg in capture.warnings:
        logger.warning("AutoAttack: %s", msg)
    n = int(images.shape[0])
    return {"clean_acc": clean.item() / n, "robust_acc": (y_adv.to(labels.device) == labels).sum().item() / n, "n": n,
            "per_attack": capture.per_attack, "warnings": capture.warnings}


def _shard_range(n: int, ctx: DistContext) -> Tensor:
    return torch.arange(n)[ctx.rank::ctx.world_size] if ctx.enabled else torch.arange(n)


def _local_batches(arrays: ImageArrays, n: int, batch_size: int, ctx: DistContext, device: torch.device
                   ) -> Iterator[Tuple[int, int, Tensor, Tensor]]:
    """The batches of the first ``n`` images as one process takes them: ``(k, b, x, y)`` for batch ``k``
    of ``b`` images, ``x`` (floats in [0, 1] on ``device``) and ``y`` this rank's strided rows of it
    (all of it on one process); batches where this rank has no rows are skipped."""
    step, offset = (ctx.world_size, ctx.rank) if ctx.enabled else (1, 0)
    for k, start in enumerate(range(0, n, int(batch_size))):
        b = min(int(batch_size), n - start)
        rows = torch.arange(start + offset, start + b, step, device=arrays.x.device)
        if len(rows) > 0:
            yield k, b, as_images(arrays.x.index_select(0, rows), device), arrays.y.index_select(0, rows).to(device)


def _batch_generator(gen: torch.Generator, b: int, ctx: DistContext) -> Generator:
    """``gen`` itself on one process; under data parallelism this rank's rows of a draw for all ``b`` images."""
    return ShardedGenerator(gen, ctx.rank, ctx.world_size, global_rows=b) if ctx.enabled else gen


def evaluate_clean(model: nn.Module, arrays: ImageArrays, batch_size: int, ctx: DistContext,
                   n: Optional[int] = None) -> Tuple[float, int]:
    """Clean accuracy of ``model`` (eval mode) on the first ``n`` images, sharded over ranks.
    Returns (accuracy, number of images). One host synchronization."""
    n = len(arrays) if n is None else min(n, len(arrays))
    idx = _shard_range(n, ctx).to(arrays.x.device)
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with EvalMode(model), torch.no_grad():  # restores each submodule's own mode
        for start in range(0, len(idx), batch_size):
            sel = idx[start:start + batch_size]
            x = as_images(arrays.x.index_select(0, sel), device)
            y = arrays.y.index_select(0, sel).to(device)
            correct += (model(x).argmax(1) == y).sum()
    correct = reduce_sum(correct, ctx)
    return int(correct) / max(n, 1), n


def evaluate_robust(model: nn.Module, arrays: ImageArrays, n: Optional[int], eps: float, steps: int, restarts: int,
                    step_size: Optional[float], batch_size: int, seed: int, ctx: DistContext
                    ) -> Dict[str, float]:
    """Clean and PGD-``steps``-``restarts`` accuracy (step ``step_size``, default eps/4) on the first ``n``
    images, in batches of ``batch_size``, in eval mode.

    The random starts of batch ``k`` come from a generator seeded with ``mix_seed(seed, k)``; under data
    parallelism every rank attacks its strided rows of each batch with its rows of that batch's draw,
    so the numbers do not depend on the number of processes. One host synchronization."""
    n = len(arrays) if n is None else min(n, len(arrays))
    device = model_device(model)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    gen = torch.Generator(device=device)
    with EvalMode(model), torch.no_grad():
        for k, b, x, y in _local_batches(arrays, n, batch_size, ctx, device):
            counts[0] += (model(x).argmax(1) == y).sum()
            gen.manual_seed(mix_seed(seed, k))
            delta = pgd_attack(model, x, y, eps, steps, step_size=step_size, restarts=restarts,
                               generator=_batch_generator(gen, b, ctx))
            counts[1] += (model(x + delta).argmax(1) == y).sum()
    clean, robust = reduce_sum(counts, ctx).tolist()
    return {"clean_acc": clean / max(n, 1), "robust_acc": robust / max(n, 1), "n": n}


def evaluate_attack_gap(model: nn.Module, method: Any, arrays: ImageArrays, n: Optional[int], eps: float, steps: int,
                        restarts: int, step_size: Optional[float], batch_size: int, seed: int, ctx: DistContext
                        ) -> Dict[str, float]:
    """Accuracy on the same first ``n`` images under the training method's own perturbation
    (``method.perturbation``) and under PGD-``steps``-``restarts``, in eval mode: the catastrophic-
    overfitting signature is a network right under its training attack and wrong under PGD.

    Random draws as in :func:`evaluate_robust` (batch ``k``: ``mix_seed(seed, k, 0)`` for the method,
    ``mix_seed(seed, k, 1)`` for PGD), independent of the number of processes. Returns
    ``{"attack_acc", "pgd_acc", "n"}``; one host synchronization."""
    n = len(arrays) if n is None else min(n, len(arrays))
    device = model_device(model)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    gen = torch.Generator(device=device)
    with EvalMode(model):
        for k, b, x, y in _local_batches(arrays, n, batch_size, ctx, device):
            gen.manual_seed(mix_seed(seed, k, 0))
            with torch.enable_grad():
                delta = method.perturbation(model, x, y, generator=_batch_generator(gen, b, ctx)).detach()
            with torch.no_grad():
                counts[0] += (model(x + delta).argmax(1) == y).sum()
                gen.manual_seed(mix_seed(seed, k, 1))
                delta = pgd_attack(model, x, y, eps, steps, step_size=step_size, restarts=restarts,
                                   generator=_batch_generator(gen, b, ctx))
                counts[1] += (model(x + delta).argmax(1) == y).sum()
    attack, pgd = reduce_sum(counts, ctx).tolist()
    return {"attack_acc": attack / max(n, 1), "pgd_acc": pgd / max(n, 1), "n": n}


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (left-aligned first column, right-aligned others)."""
    cells = [[str(h) for h in header]] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: List[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
