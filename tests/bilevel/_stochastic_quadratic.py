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

import bilevel as bl


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
    return SimpleNamespace(g=g, f=f, A=A, C=C, F=F, abar=abar, sbar=sbar, mu=mu, c=c, N=N, n=n, m=m, y_star=y_star,
                           hypergrad=hypergrad, x_star=x_star, J=J)


def box_solution(P: SimpleNamespace, upper: torch.Tensor, active: torch.Tensor) -> SimpleNamespace:
    r"""The bi-level solution with the lower constraint :math:`y \le u`, given its active set (a bool mask).

    On the active set :math:`y = u`; the free part solves the reduced lower problem, so
    :math:`h(x)` is again quadratic. The caller checks the KKT conditions (``y_free < u``, multipliers >= 0).
    """
    F = (~active).nonzero().squeeze(1)
    K = active.nonzero().squeeze(1)
    A_FF = P.A[F][:, F]

    def y_of(x):
        y = upper.clone()
        y[F] = -torch.linalg.solve(A_FF, (P.C.T @ x + P.abar)[F] + P.A[F][:, K] @ upper[K])
        return y

    J_F = -torch.linalg.solve(A_FF, P.C[:, F].T).T  # (m, |F|)

    def hypergrad(x):
        return P.mu * (x - P.c) + J_F @ (P.F @ y_of(x) - P.sbar)[F]

    Hh = P.mu * torch.eye(P.m, dtype=torch.float64) + J_F @ P.F[F][:, F] @ J_F.T
    x_star = torch.linalg.solve(Hh, -hypergrad(torch.zeros(P.m, dtype=torch.float64)))
    y = y_of(x_star)
    lower_grad = P.A @ y + P.C.T @ x_star + P.abar  # the multipliers of y <= u are -lower_grad on K
    return SimpleNamespace(x_star=x_star, y_star=y, multipliers=-lower_grad[K], y_of=y_of, hypergrad=hypergrad)


def assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, z: float = 5.0) -> None:
    """The sample mean matches ``exact`` within ``z`` standard errors per coordinate (plus rounding)."""
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    assert bool((se > 0).all()), "the estimator does not vary: not a statistical test"
    err = (mean - exact).abs()
    assert bool((err <= z * se + 1e-12).all()), f"bias beyond {z} standard errors: {(err / se).max():.2f}"


def run_single_loop(method, x0: torch.Tensor, y0: torch.Tensor, lr, steps: int) -> torch.Tensor:
    """The user's outer loop: ``x.grad = method.step(x, state)``, then torch.optim SGD (``lr`` a schedule or a number)."""
    x = x0.clone().requires_grad_()
    opt = torch.optim.SGD([x], lr=1.0)
    state = method.init(y0)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr(t) if callable(lr) else lr
        x.grad = method.step(x, state)
        opt.step()
    return x.detach(), state


def implicit_cg_x_star(P: SimpleNamespace, steps: int = 100, lr: float = 1.0) -> torch.Tensor:
    """Gradient descent on x with bilevel's full-batch Implicit(CG) hypergradient (lower solved in closed form)."""
    lower = bl.LowerProblem(lambda x, y: P.g(x, y), solver=bl.ClosedForm(P.y_star))
    strategy = bl.Implicit(bl.CG(maxiter=P.n))
    x = torch.zeros(P.m, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        P.f(x, bl.solve(lower, x, torch.zeros(P.n, dtype=torch.float64), strategy)).backward()
        opt.step()
    return x.detach()


def minibatch_single_loop(P: SimpleNamespace, method: type, lr: float, steps: int, batch_size: int = 32,
                          **options) -> float:
    """Run ``method(lower, f, **options)`` on batches of ``batch_size`` (seeds 1 and 2); return ||x - x*|| / ||x*||."""
    algo = method(bl.LowerProblem(P.g), P.f, lower_batches=bl.RandomBatches(P.N, batch_size, seed=1),
                  upper_batches=bl.RandomBatches(P.N, batch_size, seed=2), **options)
    x, _ = run_single_loop(algo, torch.zeros(P.m, dtype=torch.float64), torch.zeros(P.n, dtype=torch.float64), lr, steps)
    return float((x - P.x_star).norm() / P.x_star.norm())


def minibatch_solve_loop(P: SimpleNamespace, make_strategy, steps: int, lr: float = 0.1, batch_size: int = 64):
    """The user's loop over a stochastic strategy: TorchOptim SGD (5 warm-started steps) for y, torch.optim SGD on x,
    ``f`` on its own batch. ``make_strategy(batches)`` builds the strategy; returns (relative error, strategy)."""
    batches = bl.RandomBatches(P.N, batch_size, seed=1)
    upper_batches = bl.RandomBatches(P.N, batch_size, seed=2)
    lower = bl.LowerProblem(P.g, solver=bl.TorchOptim(torch.optim.SGD, 5, batches=batches, lr=0.3))
    strategy = make_strategy(batches)
    x = torch.zeros(P.m, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr)
    y = torch.zeros(P.n, dtype=torch.float64)
    for _ in range(steps):
        y = bl.solve(lower, x, y, strategy, check_finite=False)
        P.f(x, y, upper_batches()).backward()
        opt.step()
        opt.zero_grad()
        y = y.detach()
    return float((x.detach() - P.x_star).norm() / P.x_star.norm()), strategy
