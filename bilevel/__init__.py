r"""bilevel: bi-level optimization in PyTorch.

.. math::

    \min_x F(x) = f(x, y^\star(x)) \quad \text{s.t.} \quad y^\star(x) \in \arg\min_{y \in C} g(x, y)

Declare the lower problem (:class:`LowerProblem`: objective, constraint set, solver), pick a
hypergradient strategy (:class:`Implicit`, :class:`Unrolled`, :class:`Linearized`, :class:`FirstOrder`),
optionally how it takes second-order products (:class:`Exact`, :class:`CentralDifference`,
:class:`ForwardDifference`), and call :func:`solve`: the returned :math:`y^\star(x)` carries the
strategy's gradient, so
``f(x, y).backward()`` and any ``torch.optim`` optimizer do the rest.
"""

from ._solve import solve, value_and_hypergrad
from .constraints import Box, Constraint, Intersection, LInfBall
from .hypergrad import FirstOrder, Implicit, Linearized, Strategy, Unrolled
from .linalg import CG, DenseSolve, LinearSolveInfo, LinearSolver, Neumann
from .problem import LowerProblem
from .products import CentralDifference, Exact, ForwardDifference, Products
from .solvers import ClosedForm, GradientDescent, ProjectedGradient, SignedProjectedGradient, Solver

__version__ = "0.1.0"

__all__ = [
    "Box", "Constraint", "Intersection", "LInfBall",
    "FirstOrder", "Implicit", "Linearized", "Strategy", "Unrolled",
    "CG", "DenseSolve", "LinearSolveInfo", "LinearSolver", "Neumann",
    "LowerProblem",
    "CentralDifference", "Exact", "ForwardDifference", "Products",
    "solve", "value_and_hypergrad",
    "ClosedForm", "GradientDescent", "ProjectedGradient", "SignedProjectedGradient", "Solver",
]
