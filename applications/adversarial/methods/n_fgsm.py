"""N-FGSM: a sign step from a larger noise, projected to the image box only; first-order gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

import bilevel as bl

from ..attacks import Generator, attack_problem, model_params, threat_set, uniform_start
from .base import OptionError, TrainingMethod, attacker, bn_stats_frozen, check_bool, check_eps, check_positive

__all__ = ["NFGSM"]


@dataclass
class NFGSM(TrainingMethod):
    r"""N-FGSM (de Jorge et al., 2022): :math:`\delta_0 \sim U(-k\epsilon, k\epsilon)` (clipped to the image
    box), one sign step
    :math:`\delta = \mathrm{Proj}_{box}(\delta_0 - \alpha\, \mathrm{sign}\, \nabla_\delta g(\theta, \delta_0))`,
    and no projection back to the eps-ball: :math:`\|\delta\|_\infty \le (k + 1)\epsilon` for ``step_size = eps``.
    :class:`bilevel.Linearized` with ``sign=True`` on the box-only set; first-order gradient.

    Options:
        eps: the nominal L-inf radius (pixel units).
        noise_mult: k, the noise radius in units of eps (default 2).
        step_size: ``None`` means ``eps``.
        update_bn_on_attack: let the attack pass update BatchNorm running statistics.
    """

    eps: float
    noise_mult: float = 2.0
    step_size: Optional[float] = None
    update_bn_on_attack: bool = False
    name = "n_fgsm"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        check_positive(self.name, "step_size", self.step_size)
        check_bool(self.name, "update_bn_on_attack", self.update_bn_on_attack)
        if isinstance(self.noise_mult, bool) or not isinstance(self.noise_mult, (int, float)) or not self.noise_mult >= 0:
            raise OptionError(self.name, "noise_mult", f"must be a number >= 0, got {self.noise_mult!r}")
        if self.step_size is None:
            self.step_size = self.eps

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        model = attacker(model, attack_model)
        attack = attack_problem(model, x, y, threat_set(x, None))
        z0 = uniform_start(x, self.noise_mult * self.eps, generator)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            return bl.solve(attack, model_params(model), z0, bl.Linearized(step=self.step_size, sign=True), check_finite=False)
