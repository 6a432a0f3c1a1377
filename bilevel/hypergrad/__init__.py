"""Hypergradient strategies: how gradients flow through the lower solution."""

from .base import Strategy
from .first_order import FirstOrder
from .implicit import Implicit
from .linearized import Linearized
from .unrolled import Unrolled

__all__ = ["Strategy", "FirstOrder", "Implicit", "Linearized", "Unrolled"]
