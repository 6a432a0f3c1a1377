"""GradAlign: FGSM training with the gradient-alignment regularizer (a double backward)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel as bl

from ..attacks import Generator, attack_problem, attack_start, model_params, threat_set, uniform_noise
from .base import OptionError, TrainingMethod, attacker, bn_stats_frozen, check_bool, check_eps, check_positive

__all__ = ["GradAlign", "gradient_alignment"]


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    """:math:`\\nabla_x \\sum_i \\mathrm{CE}(h(x_i), y_i)` (with a graph to the weights if ``create_graph``)."""
    with torch.enable_grad():
        xin = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xin), y, reduction="sum"), xin, create_graph=create_graph)
    return grad


def gradient_alignment(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, clean_grad_graph: bool = False,
                       g_clean: Optional[Tensor] = None) -> Tensor:
    r"""The GradAlign regularizer
    :math:`1 - \frac{1}{|S|}\sum_{i \in S} \cos(\nabla_x \mathrm{CE}(x_i), \nabla_x \mathrm{CE}(x_i + \eta_i))`,
    differentiable in the weights through the noisy gradient (and the clean one if ``clean_grad_graph``).

    :math:`S` is the set of samples whose two input gradients are both non-zero (a cosine is undefined
    otherwise); it is handled by weights, without a host synchronization. ``g_clean`` passes an already
    computed clean input gradient (a constant), saving one forward and backward.
    """
    if g_clean is None:
        g_clean = _input_grad(model, x, y, create_graph=clean_grad_graph)
    g_clean = g_clean.flatten(1)
    g_noisy = _input_grad(model, x + noise, y, create_graph=True).flatten(1)
    n_clean, n_noisy = g_clean.norm(dim=1), g_noisy.norm(dim=1)
    valid = (n_clean > 0) & (n_noisy > 0)
    cos = (g_clean * g_noisy).sum(dim=1) / torch.where(valid, n_clean * n_noisy, torch.ones_like(n_clean))
    weights = valid.to(cos.dtype)
    return 1.0 - (cos * weights).sum() / weights.sum().clamp_min(1.0)


@dataclass
class GradAlign(TrainingMethod):
    r"""FGSM training with the gradient-alignment regularizer (Andriushchenko & Flammarion, 2020).

    Loss :math:`\mathrm{CE}(h_\theta(x + \delta_{\mathrm{FGSM}}), y) + \text{ga\_coef}\,
    \big(1 - \cos(\nabla_x \mathrm{CE}(x), \nabla_x \mathrm{CE}(x + \eta))\big)`, :math:`\eta \sim U(-\epsilon, \epsilon)`
    (not clipped to the box, as the reference code), the cosine per sample and averaged. The FGSM step is
    :class:`bilevel.Linearized` with ``sign=True`` from zero (the paper's FGSM, as the official Fast-BAT
    baseline: step ``1.25 eps`` clipped to the ball is a step of ``eps`` from zero) or from a uniform start.
    The regularizer's noisy input gradient is built with ``create_graph`` so its weight gradient flows
    (a double backward); the clean one is a constant by default, as both reference codes.

    Options:
        eps: L-inf radius (pixel units).
        ga_coef: regularization weight; ``None`` means the published value at ``eps = 8/255`` (0.2) or
            ``16/255`` (2.0); at any other radius it must be given explicitly.
        step_size: FGSM step; ``None`` means ``eps`` from a zero start, ``1.25 eps`` from a random start.
        random_start: start FGSM at a uniform point of the ball (FGSM-RS) instead of zero.
        clean_grad_graph: also differentiate the clean input gradient (the exact gradient of the
            regularizer; one more double backward).
        update_bn_on_attack: let the attack and regularizer passes update BatchNorm running statistics.
    """

    eps: float
    ga_coef: Optional[float] = None
    step_size: Optional[float] = None
    random_start: bool = False
    clean_grad_graph: bool = False
    update_bn_on_attack: bool = False
    name = "grad_align"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        check_positive(self.name, "step_size", self.step_size)
        for option in ("random_start", "clean_grad_graph", "update_bn_on_attack"):
            check_bool(self.name, option, getattr(self, option))
        if self.ga_coef is None:
            published = {8: 0.2, 16: 2.0}
            key = round(self.eps * 255)
            if key not in published or abs(self.eps * 255 - key) > 1e-6:
                raise OptionError(self.name, "ga_coef", f"is required: no published ga_coef for eps={self.eps!r}; set it "
                                  "explicitly (0.2 at 8/255 and 2.0 at 16/255 in Andriushchenko & Flammarion, 2020)")
            self.ga_coef = published[key]
        if isinstance(self.ga_coef, bool) or not isinstance(self.ga_coef, (int, float)) or not self.ga_coef >= 0:
            raise OptionError(self.name, "ga_coef", f"must be a number >= 0, got {self.ga_coef!r}")
        if self.step_size is None:
            self.step_size = 1.25 * self.eps if self.random_start else self.eps

    @property
    def requires_double_backward(self) -> bool:
        """True when the regularizer is on (``ga_coef > 0``): its noisy input gradient is differentiated."""
        return self.ga_coef > 0

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        model = attacker(model, attack_model)
        attack = attack_problem(model, x, y, threat_set(x, self.eps))
        z0 = attack_start(x, self.eps, self.random_start, generator)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            return bl.solve(attack, model_params(model), z0, bl.Linearized(step=self.step_size, sign=True), check_finite=False)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
             attack_model: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
        attack_net = attacker(model, attack_model)
        reg = None
        if self.ga_coef > 0 and not self.random_start and not self.clean_grad_graph:
            # FGSM from zero takes its sign step along the clean input gradient, which is also the
            # regularizer's constant clean gradient: compute it once (one forward/backward fewer).
            noise = uniform_noise(x, self.eps, generator)
            with bn_stats_frozen(attack_net, not self.update_bn_on_attack):
                g_clean = _input_grad(attack_net, x, y, create_graph=False)
                delta = threat_set(x, self.eps).project(self.step_size * g_clean.sign())
                reg = gradient_alignment(attack_net, x, y, noise, g_clean=g_clean)
        else:
            delta = self.perturbation(model, x, y, generator=generator, attack_model=attack_model)
            noise = uniform_noise(x, self.eps, generator)
            if self.ga_coef > 0:
                with bn_stats_frozen(attack_net, not self.update_bn_on_attack):
                    reg = gradient_alignment(attack_net, x, y, noise, self.clean_grad_graph)
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y)
        return (loss if reg is None else loss + self.ga_coef * reg), logits
