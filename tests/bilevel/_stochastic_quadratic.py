r"""A strongly convex stochastic quadratic bi-level problem with a closed-form solution (float64).

Lower, over samples :math:`i` (rows :math:`r_i, p_i, q_i, a_i`), with :math:`\tfrac1N\sum_i r_i r_i^\top = A` exactly:

.. math:: g(x, y, B) = \tfrac{1}{|B|}\sum_{i\in B} \tfrac12 (r_i^\top y)^2 + x^\top C y
          + \sigma\big[(p_i^\top x)(q_i^\top y) - x^\top M y\big] + a_i^\top y,
          \qquad M = \tfrac1N \textstyle\sum_i p_i q_i^\top,

so :math:`\mathbb E_i`-averages give :math:`g(x, y) = \tfrac12 y^\top A y + x^\top C y + \bar a^\top y`; upper, over
samples :math:`j`: :math:`f(x, y, B) = \tfrac{1}{|B|}\sum_j \tfrac12 (s_j^\top y - t_j)^2 + \tfrac{\mu}{2}\|x - c\|^2`.
``batch=None`` means the full data set. :math:`y^\star(x) = -A^{-1}(C^\top x + \bar a)` and :math:`h(x) = f(x, y^\star(x))`
is a strongly convex quadratic, so :math:`x^\star` solves one linear system.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def _whitened(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    """n rows whose second moment (1/n) X'X is exactly the identity."""
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    L = torch.linalg.cholesky(X.T @ X / n)
    return torch.linalg.solve_triangular(L, X.T, upper=False).T


def stochastic_quadratic(n: int = 6, m: int = 3, N: int = 256, noise: float = 0.3, seed: int = 0) -> SimpleNamespace:
    sigma = noise
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.5, 2.0, n, dtype=torch.float64)) @ Q.T
    R = _whitened(gen, N, n) @ torch.linalg.cholesky(A).T  # (1/N) R'R = A
    C = 0.5 * torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5
    P = torch.randn(N, m, generator=gen, dtype=torch.float64)
    Qr = torch.randn(N, n, generator=gen, dtype=torch.float64)
    M = P.T @ Qr / N
    a = noise * torch.randn(N, n, generator=gen, dtype=torch.float64) + torch.randn(n, generator=gen, dtype=torch.float64)
    S = torch.randn(N, n, generator=gen, dtype=torch.float64)
    t = S @ torch.randn(n, generator=gen, dtype=torch.float64) + noise * torch.randn(N, generator=gen, dtype=torch.float64)
    mu, c = 0.2, torch.randn(m, generator=gen, dtype=torch.float64)

    def g(x, y, batch=None):
        r, p, q, ai = (R, P, Qr, a) if batch is None else (R[batch], P[batch], Qr[batch], a[batch])
        return (0.5 * ((r @ y) ** 2).mean() + x @ C @ y + sigma * (((p @ x) * (q @ y)).mean() - x @ M @ y)
                + ai.mean(0) @ y)

    def f(x, y, batch=None):
        s, tt = (S, t) if batch is None else (S[batch], t[batch])
        return 0.5 * ((s @ y - tt) ** 2).mean() + 0.5 * mu * ((x - c) ** 2).sum()

    abar, F, sbar = a.mean(0), S.T @ S / N, S.T @ t / N

    def y_star(x):
        return -torch.linalg.solve(A, C.T @ x + abar)

    J = -torch.linalg.solve(A, C.T).T  # (m, n): d y*/dx transposed, J = -C A^{-1}

    def hypergrad(x):
        return mu * (x - c) + J @ (F @ y_star(x) - sbar)

    # grad h(x) = (mu I + J F J') x + mu * (-c) + J (F y*(0) - sbar): linear in x
    Hh = mu * torch.eye(m, dtype=torch.float64) + J @ F @ J.T
    x_star = torch.linalg.solve(Hh, -hypergrad(torch.zeros(m, dtype=torch.float64)))
    return SimpleNamespace(g=g, f=f, A=A, C=C, F=F, abar=abar, sbar=sbar, N=N, n=n, m=m, y_star=y_star,
                           hypergrad=hypergrad, x_star=x_star, J=J)
