r"""Is an implicit hypergradient trustworthy? A cheap default check of what it silently assumes.

:class:`~bilevel.Implicit` differentiates the optimality condition :math:`\nabla_y g(x, y^\star) = 0` and
solves :math:`H u = v` with :math:`H = \nabla^2_{yy} g(x, y^\star)`. Both assumptions fail without an error:

* the lower problem is not solved: the projected-gradient residual
  :math:`r(y) = \|y - \mathrm{Proj}_C(y - \eta\nabla_y g(x, y))\| / \eta` (:func:`bilevel.lower_residual`)
  at the returned :math:`y^\star` is not small against its value at ``init``: the inner step size is too
  large (above :math:`2/L` gradient descent oscillates or diverges) or there are too few steps;
* the linear system is not solved: its relative residual :math:`\|b - Au\| / \|b\|` stays large, or CG
  meets a direction of non-positive curvature :math:`p^\top A p \le 0` (:math:`H` is not positive definite:
  :math:`y^\star` is not a minimum, or :math:`g` is non-convex there and needs ``damping``).

:class:`ConvergenceCheck` computes both on the first solve and on every ``every``-th one, and warns with
:class:`HypergradientWarning` (or raises :class:`~bilevel.LowerSolveError`) naming the number and what to
change. Between checks it costs nothing; a checked solve costs two gradients of :math:`g` and one host
synchronization. Under ``vmap`` every task is checked and the message counts the failing tasks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._tree import Tree, plain_values
from .linalg import Neumann
from .problem import LowerProblem
from .residual import LowerSolveError, lower_residual

__all__ = ["ConvergenceCheck", "HypergradientWarning"]


class HypergradientWarning(RuntimeWarning):
    """The implicit hypergradient rests on an unsolved lower problem or linear system (see :class:`ConvergenceCheck`)."""


def _number(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"ConvergenceCheck: {what} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ConvergenceCheck:
    r"""Check the lower solve and the linear solve of an implicit hypergradient, on the first and every ``every``-th solve.

    The lower problem counts as solved when :math:`r(y^\star) \le \text{rtol}\cdot r(\text{init}) + \text{atol}`
    (scale-free: the solver must have reduced the residual it started from by the factor ``rtol``), the
    linear system when its relative residual is at most ``linear_rtol`` and CG met no non-positive curvature.

    Args:
        every: check on solve 1 and on every ``every``-th solve of the strategy object (each call of
            :func:`bilevel.solve`, a whole ``vmap`` batch counting once).
        rtol, atol: the lower-residual test above (``atol`` in the units of :math:`\nabla_y g`).
        linear_rtol: the largest acceptable relative residual of the linear solve.
        step: :math:`\eta` of the projected-gradient residual (it only matters with constraints);
            ``None`` takes the solver's ``step_size`` when it has one, else 1.
        error: raise :class:`~bilevel.LowerSolveError` instead of warning.
    """

    every: int = 100
    rtol: float = 1e-2
    atol: float = 1e-6
    linear_rtol: float = 1e-2
    step: Optional[float] = None
    error: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"ConvergenceCheck: every must be an integer >= 1, got {self.every!r}")
        for name in ("rtol", "atol", "linear_rtol"):
            _number(getattr(self, name), name)
        if self.step is not None and not (isinstance(self.step, (int, float)) and math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"ConvergenceCheck: step must be None or a finite number > 0, got {self.step!r}")

    def due(self, count: int) -> bool:
        """Whether solve number ``count`` (1-based) is checked."""
        return count == 1 or count % self.every == 0

    def _report(self, message: str) -> None:
        if self.error:
            raise LowerSolveError(message)
        warnings.warn(message, HypergradientWarning, stacklevel=5)

    def lower(self, lower: LowerProblem, x: Tree, init: Tree, y: Tree) -> Optional[torch.Tensor]:
        """Test :math:`r(y^\\star)` against :math:`r(\\text{init})`; return :math:`r(y^\\star)` (per task under ``vmap``).

        Skipped (``None``) for solvers that draw mini-batches: their objective needs a batch, and a
        stochastic residual has a noise floor this test does not model (use :class:`~bilevel.ResidualCheck`).
        """
        solver = lower.solver
        if getattr(solver, "batches", None) is not None:
            return None
        step = self.step if self.step is not None else float(getattr(solver, "step_size", 1.0))
        r_end = plain_values(lower_residual(lower, x, y, step))
        r_start = plain_values(lower_residual(lower, x, init, step))
        bad = ~(r_end <= self.rtol * r_start + self.atol)  # NaN counts as bad
        if bool(bad.any()):
            worst = int(torch.argmax(torch.where(bad, r_end / r_start.clamp_min(1e-300), -1.0).reshape(-1)))
            end, start = float(r_end.reshape(-1)[worst]), float(r_start.reshape(-1)[worst])
            where = f" (in {int(bad.sum())} of {bad.numel()} tasks; worst shown)" if bad.numel() > 1 else ""
            self._report(
                f"Implicit: the lower problem is not solved, so the implicit hypergradient cannot be trusted: the residual "
                f"||grad_y g|| is {end:.3g} after the solver against {start:.3g} at init (ratio {end / max(start, 1e-300):.3g}, "
                f"tolerance rtol={self.rtol:g}){where}. Solver: {solver!r}. Lower the inner step size (gradient descent "
                f"needs step_size < 2/L), run more steps, or warm-start. On a ReLU network the gradient can stall at a "
                f"kink above this tolerance even at a good step size: a looser ConvergenceCheck(rtol=...) or a smooth "
                f"activation; check=None turns this check off."
            )
        return r_end

    def linear(self, info: Any, damping: float = 0.0, solver: Any = None) -> None:
        r"""Test the linear solve's relative residual and, for CG, the smallest curvature it met.

        ``damping`` is the :math:`\rho` the system was damped with: CG measures :math:`H + \rho I`, so a
        curvature ``c`` bounds :math:`H`'s smallest eigenvalue by :math:`c - \rho`."""
        if info is None:
            return
        rel = plain_values(info.relative_residual)
        curvature = getattr(info, "min_curvature", None)
        curv = None if curvature is None else plain_values(curvature)
        n = rel.numel()
        problems = []
        bad = ~(rel <= self.linear_rtol)
        if bool(bad.any()):
            where = f" in {int(bad.sum())} of {n} tasks" if n > 1 else ""
            problems.append(f"its relative residual is {float(rel.max()):.3g} > linear_rtol={self.linear_rtol:g}{where}")
        if curv is not None and bool((curv <= 0).any()):
            low = float(curv.min())
            where = f" in {int((curv <= 0).sum())} of {n} tasks" if n > 1 else ""
            system = "p'(H + damping I)p/p'p" if damping else "p'Hp/p'p"
            problems.append(f"CG met non-positive curvature {system} = {low:.3g}{where}, so the lower Hessian H is not "
                            f"positive definite at y* (not a minimum, or a non-convex g); its smallest eigenvalue is at "
                            f"most {low - damping:.3g}, so damping must exceed {damping - low:.3g} at least")
        if problems:
            self._report("Implicit: the linear system of the implicit hypergradient is not solved: " + "; ".join(problems)
                         + ". " + _linear_remedy(solver, rel, curv, self.linear_rtol) + "; check=None turns this check off.")


def _linear_remedy(solver: Any, rel: torch.Tensor, curvature: Optional[torch.Tensor], linear_rtol: float) -> str:
    """What to change, from what failed: the curvature (the lower problem), a diverging Neumann series, or too few
    iterations of the linear solver itself."""
    if curvature is not None and bool((curvature <= 0).any()):
        return "Solve the lower problem further (smaller inner step, more steps) so that y* is a minimum, or add damping="
    name = type(solver).__name__
    if isinstance(solver, Neumann) and not bool((rel < 1).all()):
        return (f"The Neumann series grew instead of converging: its alpha={solver.alpha:g} must be below "
                "2/lambda_max(H); lower alpha (or add damping=)")
    tol = getattr(solver, "tol", None)
    if isinstance(tol, (int, float)) and tol > linear_rtol:
        return (f"{name}'s tol={tol:g} stops it above linear_rtol={linear_rtol:g}: lower tol (or raise linear_rtol "
                "if that accuracy is enough)")
    for knob in ("maxiter", "steps"):  # CG's iterations, Neumann's terms
        if hasattr(solver, knob):
            return (f"Raise {name}'s {knob} (now {getattr(solver, knob)}) or add damping= (a better-conditioned "
                    "system); if y* is far from a minimum, solve the lower problem further first")
    return "Raise the linear solver's iterations or add damping=; if y* is far from a minimum, solve the lower problem further"
