r"""The attack as a lower problem, and the evaluation attacks (PGD with restarts, AutoAttack).

An L-inf attack on a classifier :math:`h_\theta` at images :math:`x \in [0, 1]^d` with labels :math:`y` is

.. math::

    \delta^\star(\theta) \in \arg\min_{\delta \in C}\ g(\theta, \delta) = -\sum_i \mathrm{CE}(h_\theta(x_i + \delta_i), y_i),
    \qquad C = \{\|\delta\|_\infty \le \epsilon\} \cap \{0 \le x + \delta \le 1\}.

The objective is the cross-entropy SUMMED over the batch, so that :math:`\nabla_\delta g` holds every
sample's own gradient at its natural scale: the step sizes of the literature (``2/255``, ``5000/255``)
assume this reduction. :func:`attack_problem` builds this :class:`bilevel.LowerProblem`; the training
methods (:mod:`applications.adversarial.methods`) and :func:`pgd_attack` are solvers and strategies on it.

The model is called through ``torch.func.functional_call`` with the parameters passed to
:func:`bilevel.solve`, so attack steps that need no derivative in :math:`\theta` run with detached
parameters (no graph to the weights).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import bilevel as bl

__all__ = [
    "threat_set",
    "attack_problem",
    "uniform_start",
    "pgd_attack",
    "robust_accuracy",
    "autoattack_accuracy",
]


def threat_set(x: Tensor, eps: Optional[float]) -> bl.Constraint:
    r"""The set :math:`C = \{\|\delta\|_\infty \le \epsilon\} \cap \{-x \le \delta \le 1 - x\}`
    (``eps=None``: the image box only). Built without host synchronization (``check=False``)."""
    box = bl.Box(-x, 1.0 - x, check=False)
    return box if eps is None else bl.LInfBall(0.0, float(eps), check=False) & box


def attack_problem(model: nn.Module, x: Tensor, y: Tensor, constraint: bl.Constraint,
                   solver: Optional[bl.Solver] = None) -> bl.LowerProblem:
    r"""The lower problem :math:`\min_{\delta \in C} -\sum_i \mathrm{CE}(h_\theta(x_i + \delta_i), y_i)`.

    Its upper variable is ``dict(model.named_parameters())`` (buffers such as BatchNorm statistics
    are the module's own). The model is called in whatever mode (train/eval) it is in.
    """

    def objective(params: Dict[str, Tensor], delta: Tensor) -> Tensor:
        logits = functional_call(model, params, (x + delta,))
        return -F.cross_entropy(logits, y, reduction="sum")

    return bl.LowerProblem(objective=objective, constraint=constraint, solver=solver)


def uniform_start(x: Tensor, radius: float, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""A random start :math:`\delta_0 \sim U(-r, r)^d` clipped to the image box :math:`0 \le x + \delta_0 \le 1`.

    ``generator`` (on ``x``'s device) makes it reproducible; ``None`` uses the global generator.
    """
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return bl.Box(-x, 1.0 - x, check=False).project((2.0 * u - 1.0) * radius)


def _params(model: nn.Module) -> Dict[str, Tensor]:
    return dict(model.named_parameters())


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: Optional[float] = None,
               restarts: int = 1, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""L-inf PGD: ``restarts`` runs of ``steps`` signed projected-gradient ascent steps on the summed CE.

    Each run starts at :func:`uniform_start` and iterates
    :math:`\delta \leftarrow \mathrm{Proj}_C(\delta + \alpha\, \mathrm{sign}\, \nabla_\delta \mathrm{CE})`, i.e.
    :func:`bilevel.solve` of :func:`attack_problem` with :class:`bilevel.SignedProjectedGradient` and
    :class:`bilevel.FirstOrder`. For every sample the returned perturbation is the best over restarts:
    a misclassifying one if any, otherwise the one with the highest loss (misclassification first, then loss).

    The model is used in its current mode: put it in eval mode first (``model.eval()``), or BatchNorm
    uses and updates batch statistics. No host synchronization happens inside the loops.

    Args:
        eps: L-inf radius (pixel scale, e.g. ``8/255``), > 0.
        steps: number of PGD steps (>= 1).
        step_size: the step :math:`\alpha`; ``None`` means ``eps / 4``.
        restarts: number of random restarts (>= 1).
        generator: for the random starts (on ``x``'s device).

    Returns:
        ``delta`` (detached, shaped like ``x``) with :math:`\|\delta\|_\infty \le \epsilon` and :math:`0 \le x + \delta \le 1`.
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"pgd_attack: eps must be in (0, 1], got {eps}")
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"pgd_attack: restarts must be a positive integer, got {restarts}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"pgd_attack: steps must be a positive integer, got {steps}")
    alpha = eps / 4.0 if step_size is None else float(step_size)
    x = x.detach()
    lower = attack_problem(model, x, y, threat_set(x, eps), bl.SignedProjectedGradient(step_size=alpha, steps=int(steps)))
    params = _params(model)
    best_delta = torch.zeros_like(x)
    best_loss = torch.full(y.shape, -float("inf"), dtype=torch.float32, device=x.device)
    best_wrong = torch.zeros(y.shape, dtype=torch.bool, device=x.device)
    for _ in range(int(restarts)):
        delta = bl.solve(lower, params, uniform_start(x, eps, generator), bl.FirstOrder(), check_finite=False)
        with torch.no_grad():
            logits = model(x + delta)
            loss = F.cross_entropy(logits.float(), y, reduction="none")
            wrong = logits.argmax(dim=1) != y
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best_delta = torch.where(better.view(-1, *([1] * (x.ndim - 1))), delta, best_delta)
            best_loss = torch.where(better, loss, best_loss)
            best_wrong = best_wrong | wrong
    return best_delta


def _as_images(x: Tensor, device: Optional[torch.device]) -> Tensor:
    x = x.to(device) if device is not None else x
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"robust_accuracy: images must be uint8 or floating point in [0, 1], got {x.dtype}")
    return x


class _EvalMode:
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


def _model_device(model: nn.Module) -> torch.device:
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
    device = torch.device(device) if device is not None else _model_device(model)
    clean = torch.zeros((), dtype=torch.long, device=device)
    robust = torch.zeros((), dtype=torch.long, device=device)
    with _EvalMode(model), torch.no_grad():
        for start in range(0, n, int(batch_size)):
            x = _as_images(x_all[start:start + batch_size], device)
            y = y_all[start:start + batch_size].to(device)
            clean += (model(x).argmax(dim=1) == y).sum()
            delta = pgd_attack(model, x, y, eps, steps, step_size=step_size, restarts=restarts, generator=generator)
            robust += (model(x + delta).argmax(dim=1) == y).sum()
    return {"clean_acc": clean.item() / n, "robust_acc": robust.item() / n, "n": n}


def autoattack_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float,
                        version: Union[str, Sequence[str]] = "standard", batch_size: int = 500, seed: int = 0,
                        device: Optional[torch.device] = None) -> Dict[str, float]:
    r"""Robust accuracy under AutoAttack (L-inf), through ``pyautoattack`` (fra31/auto-attack repackaged).

    ``version="standard"`` is the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) whose numbers
    are comparable to RobustBench and the papers' RA-AA. A list of attack names (e.g.
    ``["apgd-ce", "apgd-t"]``) runs a custom, cheaper subset: do not report that as RA-AA.

    The model is evaluated in eval mode (previous modes restored). ``x`` may be uint8 or float in [0, 1].

    Returns:
        ``{"clean_acc": float, "robust_acc": float, "n": int}``.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'autoattack_accuracy needs the optional package pyautoattack: pip install "bilevel[autoattack]"'
        ) from err
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"autoattack_accuracy: eps must be in (0, 1], got {eps}")
    device = torch.device(device) if device is not None else _model_device(model)
    if isinstance(version, str):
        if version not in ("standard", "plus", "rand"):
            raise ValueError(f"autoattack_accuracy: version must be 'standard', 'plus', 'rand' or a list of attacks, "
                             f"got {version!r}")
        kwargs: Dict[str, Any] = {"version": version}
    else:
        kwargs = {"version": "custom", "attacks": list(version)}
    images = _as_images(x, device)
    labels = y.to(device)
    with _EvalMode(model):
        adversary = AutoAttack(model, norm="Linf", eps=float(eps), device=device, seed=int(seed), **kwargs)
        with torch.no_grad():
            clean = torch.zeros((), dtype=torch.long, device=device)
            for start in range(0, images.shape[0], int(batch_size)):
                clean += (model(images[start:start + batch_size]).argmax(dim=1) == labels[start:start + batch_size]).sum()
        _, y_adv = adversary.run_standard_evaluation(images, labels, batch_size=int(batch_size))
    n = int(images.shape[0])
    return {"clean_acc": clean.item() / n, "robust_acc": (y_adv.to(labels.device) == labels).sum().item() / n, "n": n}
