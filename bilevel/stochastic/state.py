r"""The warm-start state that a stochastic method carries across outer steps."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from .._tree import Tree

__all__ = ["StochasticState"]


@dataclass
class StochasticState:
    r"""Iterates of a stochastic bi-level method, kept by the user between outer steps (and in checkpoints).

    Attributes:
        y: the lower iterate (a tree like the lower variable).
        v: the linear-system variable :math:`v \approx -[\nabla^2_{yy} g]^{-1} \nabla_y f` (:class:`SOBA`),
            or ``None``.
        z: a second lower iterate (:class:`F2SA`: ``y`` tracks :math:`\arg\min_y f + \lambda g`, ``z`` tracks
            :math:`\arg\min_y g`), or ``None``.
        lam: the penalty :math:`\lambda` of the first-order methods (a Python float: no host sync).
        step: the number of outer steps taken.

    The samplers' random state lives with the samplers (:meth:`RandomBatches.state_dict`); save both.
    """

    y: Tree
    v: Optional[Tree] = None
    z: Optional[Tree] = None
    lam: float = 0.0
    step: int = 0

    def state_dict(self) -> Dict[str, Any]:
        """A plain dict (tensors, trees of tensors and numbers) for ``torch.save``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name])
