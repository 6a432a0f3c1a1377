r"""bilevel: bi-level optimization in PyTorch.

.. math::

    \min_x F(x) = f(x, y^\star(x)) \quad \text{s.t.} \quad y^\star(x) \in \arg\min_{y \in C} g(x, y)

Declare the lower problem (:class:`LowerProblem`: objective, constraint set, solver), pick a
hypergradient strategy (:class:`Implicit`, :class:`Unrolled`, :class:`Linearized`, :class:`FirstOrder`),
optionally how it takes second-order products (:class:`Exact`, :class:`CentralDifference`,
:class:`ForwardDifference`), and call :func:`solve`: the returned :math:`y^\star(x)` carries the
strategy's gradient, so
``f(x, y).backward()`` and any ``torch.optim`` optimizer do the rest.

For mini-batch objectives ``g(x, y, batch)``, warm starts across outer steps and the stochastic
methods (AmIGO, StocBiO, SOBA, F2SA, BOME), see :mod:`bilevel.stochastic`.
"""

from ._solve import solve, value_and_hypergrad
from .adam import Adam
from .constraints import Box, Constraint, Intersection, LInfBall
from .convergence import ConvergenceCheck, HypergradientWarning
from .hypergrad import FirstOrder, Implicit, Linearized, Strategy, Unrolled
from .linalg import CG, DenseSolve, LinearSolveInfo, LinearSolver, Neumann
from .modules import functional, load_parameters, parameters
from .problem import LowerProblem
from .products import CentralDifference, Exact, ForwardDifference, Products
from .residual import LowerSolveError, ResidualCheck, lower_residual
from .sgd import SGD
from .solvers import ClosedForm, GradientDescent, ProjectedGradient, SignedProjectedGradient, Solver
from .stochastic import BOME, F2SA, SOBA, AmIGO, RandomBatches, StocBiO, StochasticState
from .torch_optim import TorchOptim

__version__ = "0.1.0"

__all__ = [
    "Box", "Constraint", "Intersection", "LInfBall",
    "FirstOrder", "Implicit", "Linearized", "Strategy", "Unrolled",
    "CG", "DenseSolve", "LinearSolveInfo", "LinearSolver", "Neumann",
    "LowerProblem", "parameters", "functional", "load_parameters",
    "CentralDifference", "Exact", "ForwardDifference", "Products",
    "solve", "value_and_hypergrad",
    "ClosedForm", "GradientDescent", "ProjectedGradient", "SignedProjectedGradient", "Solver", "SGD", "Adam", "TorchOptim",
    "lower_residual", "ResidualCheck", "LowerSolveError", "ConvergenceCheck", "HypergradientWarning",
    "AmIGO", "StocBiO", "SOBA", "F2SA", "BOME", "StochasticState", "RandomBatches",
]
