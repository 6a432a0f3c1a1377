r"""The attack as a lower problem: its threat set, one uniform random start, and PGD.

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

from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import bilevel as bl

__all__ = [
    "Generator",
    "ShardedGenerator",
    "attack_problem",
    "attack_start",
    "model_params",
    "pgd_attack",
    "rand_like",
    "threat_set",
    "uniform_noise",
    "uniform_start",
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


@dataclass(frozen=True)
class ShardedGenerator:
    r"""Random draws of one rank of a data-parallel step, equal to its part of the single-process draw.

    The global batch of ``world_size * n`` samples is split strided: rank ``r`` holds global rows
    ``r, r + W, r + 2W, ...``. A draw shaped like the local batch ``(n, ...)`` is taken as a draw for the
    global batch ``(W n, ...)`` from ``generator`` (seeded identically on every rank) and its rows
    ``[rank::world_size]``, so every sample gets the random start it would get in one process with the
    same generator state (at the cost of ``W`` times the random numbers, negligible next to a forward).
    ``global_rows`` gives the global batch's size when it is not ``W n`` (an evaluation's last batch,
    split unevenly): the draw is then ``(global_rows, ...)``, and the local batch must be its rows
    ``[rank::world_size]``.
    """

    generator: torch.Generator
    rank: int
    world_size: int
    global_rows: Optional[int] = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ShardedGenerator: need 0 <= rank < world_size, got rank={self.rank}, "
                             f"world_size={self.world_size}")


Generator = Union[torch.Generator, ShardedGenerator, None]


def rand_like(x: Tensor, generator: Generator) -> Tensor:
    """:math:`U[0, 1)` draws shaped like ``x`` (see :class:`ShardedGenerator` for the data-parallel case)."""
    if isinstance(generator, ShardedGenerator):
        rows = generator.global_rows if generator.global_rows is not None else x.shape[0] * generator.world_size
        shape = (rows, *x.shape[1:])
        u = torch.rand(shape, generator=generator.generator, dtype=x.dtype, device=x.device)
        return u[generator.rank::generator.world_size]
    return torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def uniform_noise(x: Tensor, radius: float, generator: Generator) -> Tensor:
    """:math:`U(-r, r)` noise shaped like ``x``, through :func:`rand_like`."""
    return (2.0 * rand_like(x, generator) - 1.0) * radius


def uniform_start(x: Tensor, radius: float, generator: Generator = None) -> Tensor:
    r"""A random start :math:`\delta_0 \sim U(-r, r)^d` clipped to the image box :math:`0 \le x + \delta_0 \le 1`.

    ``generator`` (on ``x``'s device; a :class:`torch.Generator` or a :class:`ShardedGenerator`) makes it
    reproducible; ``None`` uses the global generator.
    """
    return bl.Box(-x, 1.0 - x, check=False).project(uniform_noise(x, radius, generator))


def attack_start(x: Tensor, radius: float, random: bool, generator: Generator = None) -> Tensor:
    """An attack's start: :func:`uniform_start` when ``random``, else zero (``generator`` then not consumed)."""
    return uniform_start(x, radius, generator) if random else torch.zeros_like(x)


def model_params(model: nn.Module) -> Dict[str, Tensor]:
    """The upper variable of :func:`attack_problem`: ``dict(model.named_parameters())``."""
    return dict(model.named_parameters())


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: Optional[float] = None,
               restarts: int = 1, generator: Generator = None) -> Tensor:
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
    params = model_params(model)
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
