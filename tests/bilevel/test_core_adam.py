r""":class:`bilevel.Adam`: ``torch.optim.Adam``'s iterates, the unrolled hypergradient against ``torch.func`` through
a hand-written loop (float64), and the finite derivative at an exactly-zero gradient that ``eps_root`` buys."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def _g(X, Y):
    return lambda x, w: 0.5 * ((torch.tanh(X @ w) - Y) ** 2).mean() + 0.5 * (torch.exp(x) * w * w).sum()


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_the_iterates_are_torch_optim_adam(wd):
    g, x, w0 = _g(torch.randn(16, 3), torch.randn(16)), torch.randn(3), torch.randn(3)
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adam([w], lr=0.05, betas=(0.8, 0.99), weight_decay=wd)
    for _ in range(9):
        opt.zero_grad()
        g(x, w).backward()
        opt.step()
    ours = bl.Adam(0.05, 9, betas=(0.8, 0.99), eps_root=0.0, weight_decay=wd).run(bl.LowerProblem(g), x, w0)
    torch.testing.assert_close(ours, w.detach(), rtol=1e-12, atol=1e-14)


def _hand_adam(g, x, w, lr, steps, b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-16):
    m = v = torch.zeros_like(w)
    for k in range(steps):
        d = torch.func.grad(g, argnums=1)(x, w)
        m, v = b1 * m + (1 - b1) * d, b2 * v + (1 - b2) * d * d
        w = w - lr * (m / (1 - b1 ** (k + 1))) / (torch.sqrt(v / (1 - b2 ** (k + 1)) + eps_root) + eps)
    return w


def test_unrolled_hypergradient_equals_func_through_the_hand_written_loop():
    g, x0, w0 = _g(torch.randn(16, 3), torch.randn(16)), 0.1 * torch.randn(3), torch.randn(3)
    f = lambda x, w: ((w - 1.0) ** 2).sum()
    lower = bl.LowerProblem(g, solver=bl.Adam(0.05, 6))
    got = torch.func.grad(lambda x: f(x, bl.solve(lower, x, w0, bl.Unrolled())))(x0)
    ref = torch.func.grad(lambda x: f(x, _hand_adam(g, x, w0, 0.05, 6)))(x0)
    assert ref.abs().max() > 1e-6
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    truncated = torch.func.grad(lambda x: f(x, bl.solve(lower, x, w0, bl.Unrolled(truncate=2))))(x0)
    assert torch.isfinite(truncated).all() and not torch.allclose(truncated, ref)


def test_an_exactly_zero_gradient_keeps_a_finite_hypergradient():
    """An input feature that is zero in every sample (MNIST's border pixels) gives its weight an exactly-zero
    gradient that still depends on x; with eps_root = 0 its unrolled derivative is 0/0 = NaN and spreads."""
    X = torch.randn(8, 3)
    X[:, 2] = 0.0
    g = lambda x, w: 0.5 * ((X @ w - x) ** 2).mean()
    f = lambda w: (w ** 2).sum()
    x0 = torch.randn(8)
    for eps_root, finite in [(1e-16, True), (0.0, False)]:
        lower = bl.LowerProblem(g, solver=bl.Adam(0.1, 3, eps_root=eps_root))
        grad = torch.func.grad(lambda x, lower=lower: f(bl.solve(lower, x, torch.zeros(3), bl.Unrolled())))(x0)
        assert bool(torch.isfinite(grad).all()) is finite


@pytest.mark.parametrize("bad", [dict(betas=(1.0, 0.9)), dict(betas=0.9), dict(eps=-1.0), dict(eps_root=float("nan")),
                                 dict(weight_decay=-0.1), dict(steps=0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="Adam"):
        bl.Adam(**{"step_size": 0.1, "steps": 3, **bad})
