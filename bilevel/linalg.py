r"""Linear solvers for the implicit hypergradient, on matrix-vector-product closures.

Each solver approximately solves :math:`A u = b` for a symmetric operator :math:`A` given as a
closure ``matvec(v) = A v`` on flat vectors, and returns ``(u, info)``. They run a fixed number of
iterations with no host synchronization: convergence is handled with ``torch.where`` (a converged CG
freezes its iterate), and the residual is returned as a tensor for the user to inspect when convenient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]
MatMat = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["LinearSolveInfo", "LinearSolver", "CG", "Neumann", "DenseSolve"]


@dataclass
class LinearSolveInfo:
    """Diagnostics of one linear solve (tensors; reading them is the caller's host sync).

    Attributes:
        residual_norm: :math:`\\|b - A u\\|_2`: the true residual for :class:`Neumann` and
            :class:`DenseSolve` (one extra product), CG's recursive residual unless ``CG(true_residual=True)``.
        rhs_norm: :math:`\\|b\\|_2`, so ``residual_norm / rhs_norm`` is the relative residual.
        iterations: the number of iterations run (matrix-vector products).
        min_curvature: :class:`CG` only: the smallest Rayleigh quotient :math:`p^\\top A p / p^\\top p` over
            its search directions before convergence. Non-positive means :math:`A` is not positive definite
            and CG's answer is meaningless (:class:`~bilevel.ConvergenceCheck` warns).
    """

    residual_norm: torch.Tensor
    rhs_norm: torch.Tensor
    iterations: int
    min_curvature: Optional[torch.Tensor] = None

    @property
    def relative_residual(self) -> torch.Tensor:
        return self.residual_norm / self.rhs_norm.clamp_min(torch.finfo(self.rhs_norm.dtype).tiny)


class LinearSolver:
    """Interface: ``solver(matvec, b, matmat=None, x0=None) -> (u, LinearSolveInfo)``.

    ``x0`` is a warm start (for example the previous outer step's solution); iterative solvers start
    from it, :class:`DenseSolve` ignores it.
    """

    def __call__(self, matvec: MatVec, b: torch.Tensor, matmat: Optional[MatMat] = None,
                 x0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LinearSolveInfo]:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradient for a symmetric positive-definite :math:`A`.

    Runs exactly ``maxiter`` iterations, one matrix-vector product each. Once the recursive residual
    satisfies :math:`\|r\| \le \mathrm{tol}\,\|b\|` the iterate stops changing (no host sync, so
    no early exit). Per iteration: the product, two dot products and three vector updates, as a
    hand-written CG; the freeze adds one comparison and two ``torch.where`` on scalars, and the
    curvature record (``info.min_curvature``) one more dot product.

    The reported residual is the recursive one, :math:`r_k = b - A u_k` in exact arithmetic, which
    costs nothing. In low precision it can drift below the true residual once it is near rounding
    level; ``true_residual=True`` computes :math:`\|b - A u\|` with one extra product instead.

    With a warm start ``x0`` CG iterates on :math:`A(u - x_0) = b - A x_0` (one more product); close
    to the solution, as across the outer steps of AmIGO (Arbel & Mairal, 2022), few iterations suffice.

    Args:
        maxiter: number of iterations.
        tol: relative residual (to :math:`\|b\|`) at which the iterate freezes.
        true_residual: report the true residual (one more matrix-vector product).
    """

    maxiter: int = 50
    tol: float = 1e-10
    true_residual: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, int) or self.maxiter < 1:
            raise ValueError(f"CG: maxiter must be >= 1, got {self.maxiter}")
        if not self.tol >= 0:
            raise ValueError(f"CG: tol must be >= 0, got {self.tol}")

    def __call__(self, matvec: MatVec, b: torch.Tensor, matmat: Optional[MatMat] = None,
                 x0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LinearSolveInfo]:
        if x0 is None:
            u = torch.zeros_like(b)
            r = b.clone()
        else:  # warm start: iterate on the residual of x0 (one more product)
            u = x0.detach().to(b.dtype).reshape(b.shape)
            r = b - matvec(u)
        p = r
        rs = torch.dot(r, r)
        bnorm2 = rs if x0 is None else torch.dot(b, b)
        thresh = (self.tol**2) * bnorm2
        zero = torch.zeros_like(rs)
        min_curv = torch.full_like(rs, math.inf)
        for _ in range(self.maxiter):
            # `active` is False once converged (and for b = 0): alpha = 0 freezes u and r, so rs stays
            # put and `active` stays False. The divisions may then give inf/nan in the branches
            # torch.where discards; beta = 0 keeps p finite (p = r).
            active = rs > thresh
            Ap = matvec(p)
            pAp = torch.dot(p, Ap)
            min_curv = torch.where(active, torch.minimum(min_curv, pAp / torch.dot(p, p)), min_curv)
            alpha = torch.where(active, rs / pAp, zero)
            u = torch.addcmul(u, alpha, p)
            r = torch.addcmul(r, alpha, Ap, value=-1.0)
            rs_new = torch.dot(r, r)
            p = torch.addcmul(r, torch.where(active, rs_new / rs, zero), p)
            rs = rs_new
        res = torch.linalg.vector_norm(b - matvec(u)) if self.true_residual else rs.sqrt()
        return u, LinearSolveInfo(res, bnorm2.sqrt(), self.maxiter, min_curv)


@dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""Truncated Neumann series :math:`u = \alpha \sum_{k=0}^{K-1} (I - \alpha A)^k b`.

    Converges to :math:`A^{-1} b` when the spectral radius of :math:`I - \alpha A` is below one
    (:math:`0 < \alpha < 2/\lambda_{\max}(A)` for SPD :math:`A`). With ``alpha`` equal to the lower
    solver's step, the K-term series at :math:`y^\star` equals backpropagation through K gradient steps
    started at :math:`y^\star`.

    A warm start ``x0`` applies the series to the residual: :math:`u = x_0 + \alpha \sum_k (I - \alpha A)^k (b - A x_0)`.

    Args:
        steps: number of terms K (K - 1 matrix-vector products, plus one for the residual).
        alpha: the scaling :math:`\alpha`.
    """

    steps: int = 50
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"Neumann: steps must be >= 1, got {self.steps}")
        if not self.alpha > 0:
            raise ValueError(f"Neumann: alpha must be > 0, got {self.alpha}")

    def __call__(self, matvec: MatVec, b: torch.Tensor, matmat: Optional[MatMat] = None,
                 x0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LinearSolveInfo]:
        if x0 is None:
            p = self.alpha * b
            u = p
        else:  # warm start: the series on the residual, u = x0 + alpha sum_k (I - alpha A)^k (b - A x0)
            x0 = x0.detach().to(b.dtype).reshape(b.shape)
            p = self.alpha * (b - matvec(x0))
            u = x0 + p
        for _ in range(self.steps - 1):
            p = p - self.alpha * matvec(p)
            u = u + p
        res = torch.linalg.vector_norm(b - matvec(u))
        return u, LinearSolveInfo(res, torch.linalg.vector_norm(b), self.steps)


@dataclass(frozen=True)
class DenseSolve(LinearSolver):
    r"""Materialize :math:`A` (n batched matrix-vector products) and solve exactly by LU.

    For small problems (n up to a few thousand) and as a reference. ``ridge`` adds :math:`\rho I`.
    """

    ridge: float = 0.0

    def __call__(self, matvec: MatVec, b: torch.Tensor, matmat: Optional[MatMat] = None,
                 x0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LinearSolveInfo]:
        n = b.numel()
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        A = matmat(eye) if matmat is not None else torch.stack([matvec(e) for e in eye])
        A = 0.5 * (A + A.T)
        if self.ridge:
            A = A + self.ridge * eye
        # solve_ex: no host synchronization to check for singularity (info is not read)
        u = torch.linalg.solve_ex(A, b)[0]
        res = torch.linalg.vector_norm(b - A @ u)
        return u, LinearSolveInfo(res, torch.linalg.vector_norm(b), n)
