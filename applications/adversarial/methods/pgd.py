"""PGD-k adversarial training: signed projected gradient steps, first-order gradient (Danskin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

import bilevel as bl

from ..attacks import Generator, attack_problem, attack_start, model_params, threat_set
from .base import OptionError, TrainingMethod, attacker, bn_stats_frozen, check_bool, check_eps, check_positive

__all__ = ["PGDAT"]


@dataclass
class PGDAT(TrainingMethod):
    r"""PGD-k adversarial training (Madry et al., 2018): uniform start, ``steps`` signed projected
    gradient steps (:class:`bilevel.SignedProjectedGradient`), first-order gradient (:class:`bilevel.FirstOrder`,
    Danskin's theorem).

    Options:
        eps: L-inf radius (pixel units).
        steps: number of PGD steps k (default 10).
        step_size: ``None`` means ``eps/2`` for k = 2, ``2/255`` for k = 10 (the official baselines),
            else ``2.5 * eps / k``.
        random_start: start at a uniform point of the ball (default, Madry et al.) or at zero.
        update_bn_on_attack: let the attack passes update BatchNorm running statistics.
    """

    eps: float
    steps: int = 10
    step_size: Optional[float] = None
    random_start: bool = True
    update_bn_on_attack: bool = False
    name = "pgd"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise OptionError(self.name, "steps", f"must be an integer >= 1, got {self.steps!r}")
        check_positive(self.name, "step_size", self.step_size)
        for option in ("random_start", "update_bn_on_attack"):
            check_bool(self.name, option, getattr(self, option))
        if self.step_size is None:
            self.step_size = {2: self.eps / 2, 10: 2.0 / 255}.get(self.steps, 2.5 * self.eps / self.steps)

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        model = attacker(model, attack_model)
        solver = bl.SignedProjectedGradient(step_size=self.step_size, steps=self.steps)
        attack = attack_problem(model, x, y, threat_set(x, self.eps), solver)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            z0 = attack_start(x, self.eps, self.random_start, generator)
            return bl.solve(attack, model_params(model), z0, bl.FirstOrder(), check_finite=False)
