"""Fast-BAT: the linearized attack with its implicit gradient (exact or by differences of gradients)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import bilevel as bl

from ..attacks import Generator, attack_problem, attack_start, model_params, threat_set
from .base import OptionError, TrainingMethod, attacker, bn_stats_frozen, check_bool, check_eps, check_positive

__all__ = ["PRODUCTS", "FastBAT"]


#: The names of :class:`bilevel.Products` a YAML configuration gives (``method.products: forward``) ->
#: the object (each with its step rule; objects with other options are passed from Python).
PRODUCTS: Dict[str, Callable[[], bl.Products]] = {
    "exact": bl.Exact,
    "forward": bl.ForwardDifference,
    "central": bl.CentralDifference,
}


def _official_attack_step(eps: float) -> float:
    return 5000.0 / 255 if eps <= 8.0 / 255 + 1e-12 else 2000.0 / 255


@dataclass
class FastBAT(TrainingMethod):
    r"""Fast-BAT (Zhang et al., ICML 2022): Fast-AT's linearized lower level with its implicit gradient.

    With :math:`z_0 \sim U(-\epsilon, \epsilon)` (clipped to the box; ``random_start=False``: :math:`z_0 = 0`),
    :math:`z = \mathrm{Proj}_C(z_0 - \text{z\_step}\, \nabla_\delta g(\theta, z_0))` (no graph), and

    .. math::

        \delta^\star(\theta) = \mathrm{Proj}_C\big(z - \text{attack\_step}\cdot \nabla_\delta g(\theta, z)\big),
        \qquad \frac{\mathrm{d}\delta^\star}{\mathrm{d}\theta} = -\frac{1}{\lambda}\, H_C\, \nabla^2_{\delta\theta} g(\theta, z),

    the loss :math:`\mathrm{CE}(h_\theta(x + \delta^\star(\theta)), y)` back-propagates
    :math:`\nabla_\theta \ell_{tr} + (\mathrm{d}\delta^\star/\mathrm{d}\theta)^\top \nabla_\delta \ell_{tr}`, the
    paper's eq. (14), in one backward: :class:`bilevel.Linearized` keeps :math:`\nabla_\delta g(\theta, z)`
    with a graph and the clamp of the projection supplies :math:`H_C`.

    The mixed product :math:`\nabla^2_{\theta\delta} g(\theta, z)\, w` (:math:`w = H_C \nabla_\delta \ell_{tr}`,
    known only in the backward pass) is taken as ``products`` says. Passes per step (F+B: a forward
    and a backward; "input", "weights": which gradients the backward computes):

    * ``bl.Exact()`` (default): F+B input (to :math:`z`), F+B input kept for double backward (at
      :math:`z`), F+B training, and the double backward through the kept graph; 3 F+B plus the
      double backward (``requires_double_backward``).
    * ``bl.ForwardDifference()``: F+B input (to :math:`z`), F+B input and weights at :math:`z` (the
      weight gradient :math:`\nabla_\theta g(\theta, z)` is the base of the difference, taken in the
      pass that computes the value), F+B training, and in the backward one F+B weights at
      :math:`z + h w`; 4 F+B, no double backward.
    * ``bl.CentralDifference()``: F+B input, F+B input at :math:`z`, F+B training, and in the backward
      F+B weights at :math:`z + h w` and at :math:`z - h w`; 5 F+B, no double backward.

    With ``bl.Exact()`` the pass kept for double backward runs under
    ``sdpa_kernel(SDPBackend.MATH)``: ``scaled_dot_product_attention``'s fused kernels (flash and
    memory-efficient; on CPU the flash kernel) have no double backward, the math kernel has. The
    differenced products work with every kernel. The differenced passes re-run the model; BatchNorm
    running statistics are frozen for them (always), so a step updates the statistics exactly as with
    ``bl.Exact()`` (with ``update_bn_on_attack`` one forward without graph at :math:`z` restores the
    update that the pass at :math:`z` would make). On ReLU networks the differences cross kinks and can
    be far from the exact product (the adversarial-training guide, "Implicit gradient by finite
    differences").

    Options:
        eps: L-inf radius (pixel units).
        attack_step: step of the value :math:`\delta^\star`; ``None`` means the official ``attack_lr``:
            ``5000/255`` for ``eps <= 8/255``, else ``2000/255`` (for the summed attack loss).
        z_step: step from :math:`z_0` to :math:`z` (non-sign, projected); ``None`` means ``attack_step``.
        random_start: :math:`z_0` uniform in the ball (default, the official code) or zero.
        lam: :math:`\lambda` of the implicit term; default ``10.0``, the official code's value (the value
            uses ``attack_step``, the derivative ``1/lam``). ``None`` means ``1/attack_step``, the exact
            derivative of the one-step map (the paper's :math:`\lambda = 1/\alpha`); ``math.inf`` drops
            the implicit term (first order, no second-order graph). Why 10 is the default: "The λ
            question" of the adversarial-training guide (docs/adversarial.md).
        mask_tol: ``None`` (default): :math:`H_C` is the clamp's own derivative (a coordinate is free
            unless the unprojected step lies strictly outside its bounds). A float ``t``: only
            coordinates strictly inside by more than ``t`` are free, as the official code (``t = 1e-7``).
        update_bn_on_attack: let the attack passes update BatchNorm running statistics, and add one
            forward without graph at :math:`\delta^\star` (statistics only), so that a step updates them
            as the official code's four train-mode forwards do (at :math:`z_0`, :math:`z`, and twice at
            :math:`\delta^\star`: for :math:`\nabla_\delta \ell_{tr}` and for the direct gradient).
        products: how the implicit term's mixed product is taken: ``bl.Exact()`` (default, double
            backward), ``bl.ForwardDifference()`` or ``bl.CentralDifference()`` (differences of first-order
            gradients: runs under ``torch.compile`` and on models without a double backward). In YAML a
            name of :data:`PRODUCTS` (``products: forward``).

    :meth:`official` returns the official code's settings; the defaults differ from it in
    ``mask_tol=None`` and ``update_bn_on_attack=False``.
    """

    eps: float
    attack_step: Optional[float] = None
    z_step: Optional[float] = None
    lam: Optional[float] = 10.0
    random_start: bool = True
    mask_tol: Optional[float] = None
    update_bn_on_attack: bool = False
    products: bl.Products = field(default_factory=bl.Exact)
    name = "fast_bat"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        check_positive(self.name, "attack_step", self.attack_step)
        check_positive(self.name, "z_step", self.z_step)
        if self.lam is not None and not isinstance(self.lam, bool) and isinstance(self.lam, (int, float)) \
                and self.lam == 0:
            raise OptionError(self.name, "lam", "must be > 0; for the official code's --lmbda 0 (lam = 1/attack_step, "
                              "the exact implicit term) pass lam=None (YAML: lam: null)")
        check_positive(self.name, "lam", self.lam)
        for option in ("random_start", "update_bn_on_attack"):
            check_bool(self.name, option, getattr(self, option))
        if self.mask_tol is not None and (isinstance(self.mask_tol, bool) or not isinstance(self.mask_tol, (int, float))
                                          or not self.mask_tol >= 0):
            raise OptionError(self.name, "mask_tol", f"must be None or a number >= 0, got {self.mask_tol!r}")
        if not isinstance(self.products, bl.Products):
            raise OptionError(self.name, "products", "must be bilevel.Exact(), bilevel.ForwardDifference() or "
                              f"bilevel.CentralDifference() (in YAML one of {', '.join(PRODUCTS)}), "
                              f"got {self.products!r}")
        if self.attack_step is None:
            self.attack_step = _official_attack_step(self.eps)
        if self.z_step is None:
            self.z_step = self.attack_step

    @classmethod
    def official(cls, eps: float, **overrides: object) -> FastBAT:
        """The official code's settings: ``attack_step = z_step =`` 5000/255 (2000/255 above 8/255),
        ``lam = 10``, strict-interior mask with tolerance ``1e-7``, BatchNorm statistics updated on attack passes."""
        options = {"lam": 10.0, "mask_tol": 1e-7, "update_bn_on_attack": True, **overrides}
        return cls(eps=eps, **options)

    @property
    def differenced(self) -> bool:
        """Whether the implicit term's mixed product is taken by differences of first-order gradients."""
        return isinstance(self.products, (bl.ForwardDifference, bl.CentralDifference))

    @property
    def requires_double_backward(self) -> bool:
        """True unless ``lam`` is infinite (no implicit term) or the products are differenced."""
        return (self.lam is None or math.isfinite(self.lam)) and not self.differenced

    @property
    def strategy(self) -> bl.Linearized:
        """The lower-level strategy: :class:`bilevel.Linearized` at :math:`z` with this method's step, lam,
        mask and products."""
        return bl.Linearized(step=self.attack_step, lam=self.lam, mask_tol=self.mask_tol, products=self.products)

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        r""":math:`\delta^\star(\theta)`, carrying the implicit derivative in its autograd graph (built
        through ``attack_model`` if given)."""
        model = attacker(model, attack_model)
        constraint = threat_set(x, self.eps)
        attack = attack_problem(model, x, y, constraint, bl.ProjectedGradient(step_size=self.z_step, steps=1))
        params = model_params(model)
        update_bn = self.update_bn_on_attack and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            z0 = attack_start(x, self.eps, self.random_start, generator)
            z = attack.solver.run(attack, params, z0)
            if self.differenced:
                # the differenced backward re-runs g after this block: its passes never update statistics
                lower = dataclasses.replace(attack, objective=_stats_frozen(attack.objective, model))
                delta = bl.solve(lower, params, z, self.strategy, check_finite=False)
            else:
                # the pass kept for double backward: of scaled_dot_product_attention's kernels only the math
                # one has a double backward (the fused ones raise "derivative ... not implemented")
                with sdpa_kernel(SDPBackend.MATH) if self.requires_double_backward else contextlib.nullcontext():
                    delta = bl.solve(attack, params, z, self.strategy, check_finite=False)
        if update_bn:
            with torch.no_grad():  # statistics only
                if self.differenced:  # the update the (frozen) pass at z would have made
                    model(x + z)
                model(x + delta.detach())  # the official code's extra train-mode forward at delta*
        return delta


def _stats_frozen(objective: Callable[..., Tensor], model: nn.Module) -> Callable[..., Tensor]:
    """``objective`` evaluated with ``model``'s train-mode BatchNorm statistics frozen (:func:`bn_stats_frozen`)."""

    def frozen(*args: object) -> Tensor:
        with bn_stats_frozen(model):
            return objective(*args)

    return frozen
