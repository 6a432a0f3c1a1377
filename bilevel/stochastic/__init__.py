r"""Stochastic bi-level optimization: mini-batch objectives, warm starts, and the methods of the field.

* Strategies for :func:`bilevel.solve` ("solve, then a hypergradient"): :class:`AmIGO` (warm-started SGD on
  the linear system) and :class:`StocBiO` (mini-batch Neumann series), over a mini-batch lower solver such
  as :class:`bilevel.TorchOptim`.
* Single-loop methods, one ``step(x, state)`` per outer iteration: :class:`SOBA` (second order),
  :class:`F2SA` and :class:`BOME` (first order).
* Batches (:func:`as_batches`, :class:`RandomBatches`) and the warm-start state (:class:`StochasticState`).

The objectives take a batch: ``g(x, y, batch)``, ``f(x, y, batch)``; each method's docstring says which
independent batch every quantity uses. See the documentation page "Stochastic bi-level optimization".
"""

from .amigo import AmIGO
from .base import StochasticImplicit
from .batches import BatchError, CheckedBatches, IterableBatches, RandomBatches, as_batches, check_batch
from .bome import BOME
from .f2sa import F2SA, benchopt_lam_growth
from .parallel import DataParallel, mean_over
from .single_loop import SingleLoop
from .soba import SOBA
from .state import StochasticState
from .stocbio import StocBiO
from .system import BatchSystem

__all__ = ["AmIGO", "StocBiO", "SOBA", "F2SA", "BOME", "SingleLoop", "StochasticImplicit", "BatchSystem", "StochasticState",
           "RandomBatches", "IterableBatches", "CheckedBatches", "BatchError", "as_batches", "check_batch",
           "benchopt_lam_growth", "DataParallel", "mean_over"]
