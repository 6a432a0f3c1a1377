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

One module per method (``standard``, ``fast_at``, ``fast_bat``, ``pgd``, ``grad_align``, ``n_fgsm``), their
shared interface and checks in ``base``, and the options' typing for the configuration in ``options``.

All methods run under ``torch.autocast`` (no dtype is forced; the perturbation keeps the images' dtype).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Type

from .base import OptionError, TrainingMethod, bn_stats_frozen, check_eps
from .fast_at import FastAT
from .fast_bat import PRODUCTS, FastBAT
from .grad_align import GradAlign, gradient_alignment
from .n_fgsm import NFGSM
from .pgd import PGDAT
from .standard import Standard

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

METHODS: Dict[str, Type[TrainingMethod]] = {
    cls.name: cls for cls in (Standard, FastAT, FastBAT, PGDAT, GradAlign, NFGSM)
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
