"""What every training method shares: the interface, the option checks, and the BatchNorm guard of the
attack passes (see the package docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from applications.common.config import resolved_options

from ..attacks import Generator

__all__ = ["OptionError", "TrainingMethod", "attacker", "bn_stats_frozen", "check_bool", "check_eps", "check_positive"]


def attacker(model: nn.Module, attack_model: Optional[nn.Module]) -> nn.Module:
    """The module the attack passes run through: ``attack_model`` if given, else ``model``."""
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


def check_positive(name: str, option: str, value: Optional[float], allow_none: bool = True) -> None:
    """Method ``name``'s rule for a positive number ``option`` (None allowed with ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise OptionError(name, option, f"must be a number > 0, got {value!r}")


def check_bool(name: str, option: str, value: object) -> None:
    """Method ``name``'s rule for a boolean ``option``."""
    if not isinstance(value, bool):
        raise OptionError(name, option, f"must be true or false, got {value!r}")


class TrainingMethod:
    """Interface of a training method (each subclass is a dataclass whose fields are its options)."""

    name: str = ""

    def resolved_options(self) -> Dict[str, Any]:
        """The options this method runs with, defaults resolved (e.g. Fast-BAT's ``attack_step`` from ``eps``):
        what a run's records label it with."""
        return resolved_options(self) if dataclasses.is_dataclass(self) else {}

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
