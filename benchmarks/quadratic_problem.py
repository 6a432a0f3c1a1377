r"""benchopt's simulated stochastic quadratic, drawn by our own generator, with its exact metric.

Inner variable :math:`z \in \mathbb R^{p}`, outer :math:`x \in \mathbb R^{d}`,

.. math::

    g(z, x) &= \tfrac1{n}\textstyle\sum_i \tfrac12 z^\top A_i z + \tfrac12 x^\top B_i x + x^\top C_i z
               + a_i^\top z + b_i^\top x,\\
    f(z, x) &= \tfrac1{m}\textstyle\sum_j \tfrac12 z^\top F_j z + \tfrac12 x^\top H_j x + x^\top K_j z
               + f_j^\top z + h_j^\top x,

by default :math:`n = 32768`, :math:`m = 1024`, :math:`p = 100`, :math:`d = 10`; :math:`A_i = r_i r_i^\top` rank one
with :math:`\tfrac1n\sum_i A_i = \bar A` exactly (eigenvalues log-spaced in :math:`[\mu, L] = [0.1, 1]`), :math:`\bar C`
with all singular values 0.1 plus rank-one noise :math:`C_i = \bar C + p_i q_i^\top - \tfrac1n\sum_k p_k q_k^\top`,
:math:`B_i, H_j` rank one with means that have one zero eigenvalue, :math:`F_j` rank one around :math:`\bar F`,
:math:`K_j` like :math:`C_i`, vectors standard normal. The oracles ``g(x, z, idx)`` / ``f(x, z, idx)`` average the
samples ``idx`` in the problem's dtype (float32); ``g_full`` / ``f_full`` use the mean matrices. :func:`metrics` is
the exact :math:`\|\nabla h(x)\|^2` and :math:`h(x) = f(z^\star(x), x)` in float64, with
:math:`z^\star(x) = -\bar A^{-1}(\bar C^\top x + \bar a)` and :math:`\nabla h = \nabla_x f + J^\top \nabla_z f`,
:math:`J = -\bar A^{-1}\bar C^\top`.

:data:`STEPS` holds the step sizes tuned once on this problem, shared by ``stochastic_quadratic.py``,
``hand_loops.py`` and ``benchopt_quadratic.py``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Tuple

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402

__all__ = ["make_problem", "z_star", "metrics", "STEPS", "x0", "z0", "samplers"]


def _orthogonal(gen: torch.Generator, k: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0]


def _spectrum_matrix(gen: torch.Generator, eig: torch.Tensor) -> torch.Tensor:
    Q = _orthogonal(gen, eig.numel())
    return Q @ torch.diag(eig) @ Q.T


def _rows_with_second_moment(gen: torch.Generator, n: int, M: torch.Tensor) -> torch.Tensor:
    """n rows r_i with (1/n) sum r_i r_i' = M exactly (M symmetric PSD): whitened Gaussians times M^{1/2}."""
    X = torch.randn(n, M.shape[0], generator=gen, dtype=torch.float64)
    L = torch.linalg.cholesky(X.T @ X / n)
    X = torch.linalg.solve_triangular(L, X.T, upper=False).T
    w, V = torch.linalg.eigh(M)
    return X @ (V * w.clamp_min(0).sqrt()) @ V.T


def _cross(gen: torch.Generator, n: int, d: int, p: int, sv: float, noise: float):
    """Mean cross matrix (d, p) with all singular values ``sv``, and rank-one noise rows P (n, d), Q (n, p)."""
    C = sv * _orthogonal(gen, d) @ _orthogonal(gen, p)[:d]
    P = torch.randn(n, d, generator=gen, dtype=torch.float64) / d**0.5
    Q = noise * torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5
    return C, P, Q, P.T @ Q / n


def make_problem(n_inner: int = 32768, n_outer: int = 1024, p: int = 100, d: int = 10, mu: float = 0.1,
                 L: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """The problem as a namespace: oracles ``g``, ``f`` (mini-batch), ``g_full``, ``f_full``; the float64 mean
    matrices ``exact``; ``J`` = dz*/dx and the reduced Hessian of h; the sizes, ``dtype`` and the cast tensors ``t``."""
    gen = torch.Generator().manual_seed(seed)
    logspace = torch.logspace(math.log10(mu), math.log10(L), p, dtype=torch.float64)
    one_zero = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.logspace(math.log10(mu), math.log10(L), d - 1, dtype=torch.float64)])
    A, F = _spectrum_matrix(gen, logspace), _spectrum_matrix(gen, logspace)
    B, H = _spectrum_matrix(gen, one_zero), _spectrum_matrix(gen, one_zero)
    R, S = _rows_with_second_moment(gen, n_inner, A), _rows_with_second_moment(gen, n_inner, B)
    RF, SH = _rows_with_second_moment(gen, n_outer, F), _rows_with_second_moment(gen, n_outer, H)
    C, Pc, Qc, Mc = _cross(gen, n_inner, d, p, 0.1, 0.1)
    K, Pk, Qk, Mk = _cross(gen, n_outer, d, p, 0.1, 0.1)
    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    a, b, fv, hv = normal(n_inner, p), normal(n_inner, d), normal(n_outer, p), normal(n_outer, d)
    exact = SimpleNamespace(A=A, B=B, C=C, a=a.mean(0), b=b.mean(0), F=F, H=H, K=K, f=fv.mean(0), h=hv.mean(0))
    cast = {k: v.to(dtype) for k, v in dict(R=R, S=S, RF=RF, SH=SH, CM=C - Mc, Pc=Pc, Qc=Qc, KM=K - Mk, Pk=Pk, Qk=Qk,
                                             a=a, b=b, fv=fv, hv=hv, A=A, B=B, C=C, F=F, H=H, K=K).items()}
    t = SimpleNamespace(**cast)
    t.abar, t.bbar, t.fbar, t.hbar = (v.mean(0).to(dtype) for v in (a, b, fv, hv))

    def g(x, z, idx):
        r, s = t.R[idx], t.S[idx]
        return (0.5 * (r @ z).square().mean() + 0.5 * (s @ x).square().mean() + x @ t.CM @ z
                + ((t.Pc[idx] @ x) * (t.Qc[idx] @ z)).mean() + t.a[idx].mean(0) @ z + t.b[idx].mean(0) @ x)

    def f(x, z, idx):
        r, s = t.RF[idx], t.SH[idx]
        return (0.5 * (r @ z).square().mean() + 0.5 * (s @ x).square().mean() + x @ t.KM @ z
                + ((t.Pk[idx] @ x) * (t.Qk[idx] @ z)).mean() + t.fv[idx].mean(0) @ z + t.hv[idx].mean(0) @ x)

    def g_full(x, z):  # the mean matrices: the full-batch lower objective
        return 0.5 * z @ t.A @ z + 0.5 * x @ t.B @ x + x @ t.C @ z + t.abar @ z + t.bbar @ x

    def f_full(x, z):
        return 0.5 * z @ t.F @ z + 0.5 * x @ t.H @ x + x @ t.K @ z + t.fbar @ z + t.hbar @ x

    J = -torch.linalg.solve(A, C.T)  # dz*/dx, (p, d)
    reduced = H + K @ J + J.T @ K.T + J.T @ F @ J
    return SimpleNamespace(g=g, f=f, g_full=g_full, f_full=f_full, exact=exact, J=J, reduced_hessian=reduced,
                           n_inner=n_inner, n_outer=n_outer, p=p, d=d, dtype=dtype, t=t)


def z_star(P: SimpleNamespace, x: torch.Tensor) -> torch.Tensor:
    e = P.exact
    return -torch.linalg.solve(e.A, e.C.T @ x.double() + e.a)


def metrics(P: SimpleNamespace, x: torch.Tensor) -> Dict[str, float]:
    """Exact ||grad h(x)||^2 and h(x) = f(z*(x), x) in float64 from the mean matrices."""
    e, x = P.exact, x.detach().double()
    z = z_star(P, x)
    grad = e.H @ x + e.K @ z + e.h + P.J.T @ (e.F @ z + e.K.T @ x + e.f)
    h = 0.5 * z @ e.F @ z + 0.5 * x @ e.H @ x + x @ e.K @ z + e.f @ z + e.h @ x
    return {"grad_norm2": float(grad @ grad), "h": float(h)}


# Step sizes: tuned by hand once on this problem (a short grid, float32), then fixed.
# (SOBA: rho, gamma in {0.05, 0.1, 0.3, 0.5}; AmIGO / StocBiO: x step in {1.0, 0.3, 0.1, 0.05}, inner and system
# steps 0.3 or 0.1; F2SA: lam0 in {10, 100}; BOME: xi in {0.03, 0.1, 0.3}; Implicit(CG): 100 lower steps and CG(20)
# or 50 and CG(10).)
STEPS = {
    "SOBA": {"rho": 0.1, "gamma": 0.05},
    "AmIGO": {"inner_lr": 0.3, "inner_steps": 10, "v_lr": 0.3, "v_steps": 10, "gamma": 0.1},
    "StocBiO": {"inner_lr": 0.3, "inner_steps": 10, "v_lr": 0.3, "v_steps": 10, "gamma": 0.1},
    "F2SA": {"rho": 0.1, "gamma": 0.1, "lam": 100.0, "lam_growth": 0.01},
    "BOME": {"alpha": 0.5, "xi": 0.03, "inner_steps": 10, "eta": 0.5},
    "Implicit(CG)": {"lower_step": 1.0, "lower_steps": 50, "cg": 10, "gamma": 1.0},
    "Unrolled": {"lower_step": 1.0, "lower_steps": 30, "gamma": 1.0},
}


def x0(P: SimpleNamespace) -> torch.Tensor:
    """The outer starting point, -2 * ones (a leaf that requires grad)."""
    return torch.full((P.d,), -2.0, dtype=P.dtype, requires_grad=True)


def z0(P: SimpleNamespace) -> torch.Tensor:
    """The lower starting point, zeros."""
    return torch.zeros(P.p, dtype=P.dtype)


def samplers(P: SimpleNamespace, batch: int, seed: int) -> Tuple[bl.RandomBatches, bl.RandomBatches]:
    """Mini-batch index samplers (with replacement) of the inner and the outer samples."""
    return bl.RandomBatches(P.n_inner, batch, seed=seed), bl.RandomBatches(P.n_outer, batch, seed=seed + 1)
