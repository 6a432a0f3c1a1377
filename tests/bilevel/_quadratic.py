"""The quadratic lower problem g(x, y) = 0.5 y'Hy + x'Cy + a'y shared by the core tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def quadratic(n: int = 4, m: int = 3, linear_term: bool = True) -> SimpleNamespace:
    """H symmetric with eigenvalues in [1, 3], C (m, n), a (n,) (zero if not ``linear_term``);
    ``y_star(x) = -H^{-1}(C'x + a)``."""
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    H = Q @ torch.diag(torch.linspace(1.0, 3.0, n)) @ Q.T
    C = torch.randn(m, n)
    a0 = torch.randn(n) if linear_term else torch.zeros(n)

    def g(x, y):
        return 0.5 * y @ H @ y + x @ C @ y + a0 @ y

    def y_star(x):
        return -torch.linalg.solve(H, C.T @ x + a0)

    return SimpleNamespace(H=H, C=C, a0=a0, g=g, y_star=y_star)
