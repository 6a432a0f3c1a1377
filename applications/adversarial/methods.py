r"""Adversarial training methods as bi-level problems over the :mod:`bilevel` core.

Every method trains

.. math::

    \min_\theta\ \mathbb{E}_{(x, y)}\, \mathrm{CE}\big(h_\theta(x + \delta^\star(\theta)), y\big)
    \quad \text{s.t.} \quad \delta^\star(\theta) \approx \arg\min_{\delta \in C} g(\theta, \delta),

with the attack :math:`g = -\sum_i \mathrm{CE}` of :func:`~applications.adversarial.attacks.attack_problem`
and :math:`C = \{\|\delta\|_\infty \le \epsilon\} \cap \{0 \le x + \delta \le 1\}`. A method is the choice
of start, lower solver and hypergradient strategy (``δ*`` the lower solution, ``dδ*/dθ`` what the
training gradient sees of it)::

    standard     δ = 0
    fast_at      one sign step from a uniform start (FGSM-RS)   dδ*/dθ = 0 (the sign has zero derivative)
    fast_bat     one gradient step from z                        dδ*/dθ = -(1/λ) H_C ∇²_{δθ} g(θ, z)
    pgd          k signed projected gradient steps               dδ*/dθ = 0 (Danskin, first order)
    grad_align   FGSM from zero + gradient-alignment regularizer dδ*/dθ = 0; the regularizer is double-backward
    n_fgsm       one sign step from U(-kε, kε) noise, box only   dδ*/dθ = 0

``method.loss(model, x, y)`` returns ``(loss, logits)``: ``loss.backward()`` leaves the method's full
gradient (for Fast-BAT including the implicit term) in the parameters' ``.grad``, and the trainer
calls ``optimizer.step()``. Images are floats in [0, 1]; ``eps`` and steps are in pixel units
(``8/255``). The training loss is the batch-mean cross-entropy.

**Data parallelism.** ``method.loss(ddp_model, x, y, attack_model=module)`` runs every attack pass,
input-gradient pass (GradAlign) and the Fast-BAT linearization through ``attack_model`` (the plain
module under the ``DistributedDataParallel`` wrapper, whose parameters are the same tensors) and only
the final training forward :math:`h_\theta(x + \delta^\star)` through ``model``. One backward then
reaches each parameter both directly and through :math:`\delta^\star(\theta)`; autograd sums both
before the parameter's gradient-accumulation hook fires, so DDP all-reduces the total hypergradient
once. ``attack_model=None`` means ``model``.
:class:`~applications.adversarial.attacks.ShardedGenerator` makes the random starts of a rank the rank's
rows of the single-process draw for the global batch.

**BatchNorm.** Attack passes run the model in its current mode, so in train mode BatchNorm normalizes
with the batch statistics (as the official code does) but, by default
(``update_bn_on_attack=False``), does not update ``running_mean``/``running_var``/``num_batches_tracked``:
only the training forward at :math:`x + \delta^\star` does, once per step as in standard training
(see :func:`bn_stats_frozen`). ``update_bn_on_attack=True`` lets every attack pass update them, as
the official code does.

All methods run under ``torch.autocast`` (no dtype is forced; the perturbation keeps the images' dtype).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import bilevel as bl

from .attacks import Generator, attack_problem, model_params, threat_set, uniform_noise, uniform_start

__all__ = [
    "TrainingMethod",
    "Standard",
    "FastAT",
    "FastBAT",
    "PGDAT",
    "GradAlign",
    "NFGSM",
    "METHODS",
    "OptionError",
    "PRODUCTS",
    "build_method",
    "check_eps",
    "bn_stats_frozen",
    "gradient_alignment",
]


def _attacker(model: nn.Module, attack_model: Optional[nn.Module]) -> nn.Module:
    return model if attack_model is None else attack_model


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    r"""Within the block, BatchNorm layers in train mode normalize with batch statistics but do not
    update their running statistics (nor ``num_batches_tracked``).

    Exact and free: PyTorch's BatchNorm passes its running buffers to ``F.batch_norm`` only when
    ``track_running_stats`` is set (or in eval mode), and increments ``num_batches_tracked`` only then,
    so turning the flag off for train-mode layers gives batch statistics and leaves the buffers
    untouched. Eval-mode layers are not touched (they use and keep their running statistics).
    The autograd graph built inside the block (e.g. Fast-BAT's double-backward graph) is unaffected.
    """
    if not enabled:
        yield model
        return
    changed: List[nn.modules.batchnorm._BatchNorm] = []
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
                m.track_running_stats = False
                changed.append(m)
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True


class OptionError(ValueError):
    """An invalid option of a training method: ``method`` (its name), ``option`` (the field) and
    ``detail`` (what is wrong, e.g. "must be a number > 0, got -1")."""

    def __init__(self, method: str, option: str, detail: str) -> None:
        self.method, self.option, self.detail = method, option, detail
        super().__init__(f"{method}: {option} {detail}")


def check_eps(name: str, eps: float, allow_zero: bool = False) -> None:
    """The methods' rule for ``eps``: a number in (0, 1] (pixel units; [0, 1] with ``allow_zero``)."""
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and (0.0 <= eps <= 1.0 if allow_zero else 0.0 < eps <= 1.0)
    if not ok:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise OptionError(name, "eps", f"must be a number in {interval} (pixel units, e.g. 8/255), got {eps!r}")


def _check_positive(name: str, option: str, value: Optional[float], allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise OptionError(name, option, f"must be a number > 0, got {value!r}")


def _check_bool(name: str, option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionError(name, option, f"must be true or false, got {value!r}")


class TrainingMethod:
    """Interface of a training method (each subclass is a dataclass whose fields are its options)."""

    name: str = ""

    @property
    def requires_double_backward(self) -> bool:
        """Whether ``loss(...).backward()`` differentiates through an input gradient (a double backward,
        which ``torch.compile``'s AOT autograd does not support)."""
        return False

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        r"""The training perturbation :math:`\delta^\star(\theta)`, shaped like ``x``; its autograd graph to the
        parameters is the method's hypergradient (none for first-order methods).

        ``generator`` (on ``x``'s device; a :class:`torch.Generator` or a
        :class:`~applications.adversarial.attacks.ShardedGenerator`)
        controls the method's randomness; ``None`` uses the global one. Every pass runs through
        ``attack_model`` if given (a module sharing ``model``'s parameters, e.g. the one under a DDP
        wrapper), else ``model``.
        """
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
             attack_model: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
        """Return ``(scalar training loss, logits used for the train accuracy)``: by default the batch-mean
        cross-entropy at ``x + perturbation``; ``loss.backward()`` leaves the method's full gradient in ``.grad``.

        Only the training forward at ``x + perturbation`` runs through ``model``; the attack passes run
        through ``attack_model`` (default ``model``), which must share ``model``'s parameter tensors."""
        delta = self.perturbation(model, x, y, generator=generator, attack_model=attack_model)
        logits = model(x + delta)
        return F.cross_entropy(logits, y), logits


@dataclass
class Standard(TrainingMethod):
    """Plain training: :math:`\\min_\\theta \\mathrm{CE}(h_\\theta(x), y)`. ``eps`` is accepted and ignored."""

    eps: float = 0.0
    name = "standard"

    def __post_init__(self) -> None:
        check_eps("standard", self.eps, allow_zero=True)

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        return torch.zeros_like(x)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
             attack_model: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits


@dataclass
class FastAT(TrainingMethod):
    r"""Fast-AT / FGSM-RS (Wong, Rice & Kolter, 2020).

    :math:`\delta_0 \sim U(-\epsilon, \epsilon)` clipped to the image box, then
    :math:`\delta^\star = \mathrm{Proj}_C(\delta_0 - \alpha\, \mathrm{sign}\, \nabla_\delta g(\theta, \delta_0))`:
    exactly :class:`bilevel.Linearized` with ``sign=True`` at :math:`z = \delta_0`, whose derivative in
    :math:`\theta` is zero (first-order gradient).

    Options:
        eps: L-inf radius (pixel units).
        step_size: :math:`\alpha`; ``None`` means ``1.25 * eps`` (Wong et al.).
        update_bn_on_attack: let the attack pass update BatchNorm running statistics.
    """

    eps: float
    step_size: Optional[float] = None
    update_bn_on_attack: bool = False
    name = "fast_at"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        _check_positive(self.name, "step_size", self.step_size)
        _check_bool(self.name, "update_bn_on_attack", self.update_bn_on_attack)
        if self.step_size is None:
            self.step_size = 1.25 * self.eps

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        model = _attacker(model, attack_model)
        attack = attack_problem(model, x, y, threat_set(x, self.eps))
        z0 = uniform_start(x, self.eps, generator)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            return bl.solve(attack, model_params(model), z0, bl.Linearized(step=self.step_size, sign=True), check_finite=False)


def _official_attack_step(eps: float) -> float:
    return 5000.0 / 255 if eps <= 8.0 / 255 + 1e-12 else 2000.0 / 255


@dataclass
class FastBAT(TrainingMethod):
    r"""Fast-BAT (Zhang et al., ICML 2022): Fast-AT's linearized lower level with its implicit gradient.

    With :math:`z_0 \sim U(-\epsilon, \epsilon)` (clipped to the box),
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
    mask_tol: Optional[float] = None
    update_bn_on_attack: bool = False
    products: bl.Products = field(default_factory=bl.Exact)
    name = "fast_bat"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        _check_positive(self.name, "attack_step", self.attack_step)
        _check_positive(self.name, "z_step", self.z_step)
        if self.lam is not None and not isinstance(self.lam, bool) and isinstance(self.lam, (int, float)) \
                and self.lam == 0:
            raise OptionError(self.name, "lam", "must be > 0; for the official code's --lmbda 0 (lam = 1/attack_step, "
                              "the exact implicit term) pass lam=None (YAML: lam: null)")
        _check_positive(self.name, "lam", self.lam)
        _check_bool(self.name, "update_bn_on_attack", self.update_bn_on_attack)
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
        model = _attacker(model, attack_model)
        constraint = threat_set(x, self.eps)
        attack = attack_problem(model, x, y, constraint, bl.ProjectedGradient(step_size=self.z_step, steps=1))
        params = model_params(model)
        update_bn = self.update_bn_on_attack and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            z = attack.solver.run(attack, params, uniform_start(x, self.eps, generator))
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
        update_bn_on_attack: let the attack passes update BatchNorm running statistics.
    """

    eps: float
    steps: int = 10
    step_size: Optional[float] = None
    update_bn_on_attack: bool = False
    name = "pgd"

    def __post_init__(self) -> None:
        check_eps(self.name, self.eps)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise OptionError(self.name, "steps", f"must be an integer >= 1, got {self.steps!r}")
        _check_positive(self.name, "step_size", self.step_size)
        _check_bool(self.name, "update_bn_on_attack", self.update_bn_on_attack)
        if self.step_size is None:
            self.step_size = {2: self.eps / 2, 10: 2.0 / 255}.get(self.steps, 2.5 * self.eps / self.steps)

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        model = _attacker(model, attack_model)
        solver = bl.SignedProjectedGradient(step_size=self.step_size, steps=self.steps)
        attack = attack_problem(model, x, y, threat_set(x, self.eps), solver)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            return bl.solve(attack, model_params(model), uniform_start(x, self.eps, generator), bl.FirstOrder(),
                            check_finite=False)


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
        _check_positive(self.name, "step_size", self.step_size)
        for option in ("random_start", "clean_grad_graph", "update_bn_on_attack"):
            _check_bool(self.name, option, getattr(self, option))
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
        model = _attacker(model, attack_model)
        attack = attack_problem(model, x, y, threat_set(x, self.eps))
        z0 = uniform_start(x, self.eps, generator) if self.random_start else torch.zeros_like(x)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            return bl.solve(attack, model_params(model), z0, bl.Linearized(step=self.step_size, sign=True), check_finite=False)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
             attack_model: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
        attacker = _attacker(model, attack_model)
        reg = None
        if self.ga_coef > 0 and not self.random_start and not self.clean_grad_graph:
            # FGSM from zero takes its sign step along the clean input gradient, which is also the
            # regularizer's constant clean gradient: compute it once (one forward/backward fewer).
            noise = uniform_noise(x, self.eps, generator)
            with bn_stats_frozen(attacker, not self.update_bn_on_attack):
                g_clean = _input_grad(attacker, x, y, create_graph=False)
                delta = threat_set(x, self.eps).project(self.step_size * g_clean.sign())
                reg = gradient_alignment(attacker, x, y, noise, g_clean=g_clean)
        else:
            delta = self.perturbation(model, x, y, generator=generator, attack_model=attack_model)
            noise = uniform_noise(x, self.eps, generator)
            if self.ga_coef > 0:
                with bn_stats_frozen(attacker, not self.update_bn_on_attack):
                    reg = gradient_alignment(attacker, x, y, noise, self.clean_grad_graph)
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y)
        return (loss if reg is None else loss + self.ga_coef * reg), logits


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
        _check_positive(self.name, "step_size", self.step_size)
        _check_bool(self.name, "update_bn_on_attack", self.update_bn_on_attack)
        if isinstance(self.noise_mult, bool) or not isinstance(self.noise_mult, (int, float)) or not self.noise_mult >= 0:
            raise OptionError(self.name, "noise_mult", f"must be a number >= 0, got {self.noise_mult!r}")
        if self.step_size is None:
            self.step_size = self.eps

    def perturbation(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: Generator = None,
                     attack_model: Optional[nn.Module] = None) -> Tensor:
        model = _attacker(model, attack_model)
        attack = attack_problem(model, x, y, threat_set(x, None))
        z0 = uniform_start(x, self.noise_mult * self.eps, generator)
        with bn_stats_frozen(model, not self.update_bn_on_attack):
            return bl.solve(attack, model_params(model), z0, bl.Linearized(step=self.step_size, sign=True), check_finite=False)


METHODS: Dict[str, Type[TrainingMethod]] = {
    cls.name: cls for cls in (Standard, FastAT, FastBAT, PGDAT, GradAlign, NFGSM)
}

#: The names of :class:`bilevel.Products` a YAML configuration gives (``method.products: forward``) ->
#: the object (each with its step rule; objects with other options are passed from Python).
PRODUCTS: Dict[str, Callable[[], bl.Products]] = {
    "exact": bl.Exact,
    "forward": bl.ForwardDifference,
    "central": bl.CentralDifference,
}


def build_method(name: str, **options: object) -> TrainingMethod:
    """Build the training method ``name`` (a key of :data:`METHODS`) with its dataclass options.

    A ``products`` option may be a name of :data:`PRODUCTS` (as in YAML) instead of the object.

    Raises:
        ValueError: unknown method name (the message lists the valid ones) or an invalid option value.
        TypeError: an unknown option (the message lists the method's options) or a missing ``eps``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"training method {name!r}: unknown option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(fields)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in options]
    if missing:
        raise TypeError(f"training method {name!r}: missing required option(s) {', '.join(missing)}")
    products = options.get("products")
    if isinstance(products, str):
        if products not in PRODUCTS:
            raise OptionError(name, "products", f"must be one of {', '.join(PRODUCTS)}, got {products!r}")
        options = {**options, "products": PRODUCTS[products]()}
    return cls(**options)

