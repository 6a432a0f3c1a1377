"""Fast-AT (FGSM with a random start): a sign step of the linearized attack, first-order gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

import bilevel as bl

from ..attacks import Generator, attack_problem, attack_start, model_params, threat_set
from .base import TrainingMethod, attacker, bn_stats_frozen, check_bool, check_eps, check_positive

__all__ = ["FastAT"]


@dataclass
class FastAT(TrainingMethod):
    r"""Fast-AT / FGSM-RS (Wong, Rice & Kolter, 2020).

    :math:`\delta_0 \sim U(-\epsilon, \epsilon)` clipped to the image box (``random_start=False``: :math:`\delta_0 = 0`,
    plain FGSM), then
    :math:`\delta^\star = \mathrm{Proj}_C(\delta_0 - \alpha\, \mathrm{sign}\, \nabla_\delta g(\theta, \delta_0))`:
    exactly :class:`bilevel.Linearized` with ``sign=True`` at :math:`z = \delta_0`, whose derivative in
    :math:`\theta` is zero (first-order gradient).

    Options:
        eps: L-inf radius (pixel units).
        step_size: :math:`\alpha`; ``None`` means ``1.25 * eps`` (Wong et al.; from a zero start the projection
            makes any step >= eps the step eps).
        random_start: start at a uniform point of the ball (default) or at zero (FGSM, Goodfellow et al., 2015).
        update_bn_on_attack: let the attack pass update BatchNorm running statistics.
    """

    eps: float
    step_size: Optional[float] = None
    random_start: bool = True
    update_bn_on_attack: bool = False
    name = "fast_at"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        check_positive(self.name, "step_size", self.step_size)
        for option in ("random_start", "update_bn_on_attack"):
            check_bool(self.name, option, getattr(self, option))
        if self.step_size is None:
            self.step_size = 1.25 * self.eps

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        model = attacker(model, attack_model)
        attack = attack_problem(model, x, y, threat_set(x, self.eps))
        z0 = attack_start(x, self.eps, self.random_start, generator)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            return bl.solve(attack, model_params(model), z0, bl.Linearized(step=self.step_size, sign=True), check_finite=False)
