r"""The warm-start state that a stochastic method carries across outer steps."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from .._tree import Tree, leaves

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
        """Restore from :meth:`state_dict`. Raises ``ValueError`` if keys are missing or unknown, or if a saved
        iterate's tree structure or shapes differ from this state's (a checkpoint of another problem)."""
        names = [f.name for f in fields(self)]
        if not isinstance(state, dict):
            raise ValueError(f"StochasticState.load_state_dict: expected a dict from state_dict(), got {type(state).__name__}")
        missing, unknown = [n for n in names if n not in state], sorted(set(state) - set(names))
        if missing or unknown:
            raise ValueError(f"StochasticState.load_state_dict: not a StochasticState state (missing keys {missing}, "
                             f"unknown keys {unknown})")
        for name in ("y", "v", "z"):
            mine, theirs = getattr(self, name), state[name]
            if mine is None or theirs is None:
                continue
            (a, spec_a), (b, spec_b) = leaves(mine), leaves(theirs)
            if spec_a != spec_b or [tuple(t.shape) for t in a] != [tuple(t.shape) for t in b]:
                raise ValueError(f"StochasticState.load_state_dict: the saved {name} has shapes "
                                 f"{[tuple(t.shape) for t in b]} (structure {spec_b}), this state's "
                                 f"{[tuple(t.shape) for t in a]} (structure {spec_a}): a state of another problem")
        for name in names:
            setattr(self, name, state[name])
