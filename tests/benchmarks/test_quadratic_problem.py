"""benchmarks/quadratic_problem.py: the mini-batch oracles average to the mean-matrix objectives over all
samples, z*(x) is the lower minimizer, and the exact metric is the gradient of h(x) = f(z*(x), x), checked
against autograd through a float64 linear solve and against central differences."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quadratic_problem import make_problem, metrics, samplers, x0, z0, z_star  # noqa: E402

SIZES = dict(n_inner=256, n_outer=64, p=12, d=4, dtype=torch.float64)


def _point(P, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(P.d, generator=gen, dtype=torch.float64), torch.randn(P.p, generator=gen, dtype=torch.float64)


def test_the_oracles_over_all_samples_are_the_mean_objectives():
    P = make_problem(seed=3, **SIZES)
    x, z = _point(P)
    assert torch.allclose(P.g(x, z, torch.arange(P.n_inner)), P.g_full(x, z), rtol=1e-12, atol=1e-12)
    assert torch.allclose(P.f(x, z, torch.arange(P.n_outer)), P.f_full(x, z), rtol=1e-12, atol=1e-12)
    eig = torch.linalg.eigvalsh(P.exact.A)
    assert abs(eig.min() - 0.1) < 1e-10 and abs(eig.max() - 1.0) < 1e-10  # the lower problem's spectrum [mu, L]


def test_z_star_minimizes_g_and_the_metric_is_the_gradient_of_h():
    P = make_problem(seed=3, **SIZES)
    x, _ = _point(P)
    z = z_star(P, x).requires_grad_()
    (gz,) = torch.autograd.grad(P.g_full(x, z), z)
    assert gz.abs().max() < 1e-10

    def h(x):
        return P.f_full(x, z_star(P, x))

    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(h(xr), xr)
    m = metrics(P, x)
    assert abs(m["grad_norm2"] - float(grad @ grad)) < 1e-9 * max(1.0, float(grad @ grad))
    assert abs(m["h"] - float(h(x))) < 1e-10
    eps = 1e-6
    fd = torch.stack([(h(x + eps * e) - h(x - eps * e)) / (2 * eps) for e in torch.eye(P.d, dtype=torch.float64)])
    assert torch.allclose(fd, grad, atol=1e-7)


def test_starting_points_and_samplers():
    P = make_problem(seed=0, **SIZES)
    assert torch.equal(x0(P), torch.full((P.d,), -2.0, dtype=torch.float64)) and x0(P).requires_grad
    assert torch.equal(z0(P), torch.zeros(P.p, dtype=torch.float64))
    inner, outer = samplers(P, 16, seed=5)
    a, b = inner(), outer()
    assert a.shape == (16,) and b.shape == (16,) and int(a.max()) < P.n_inner and int(b.max()) < P.n_outer
    again, _ = samplers(P, 16, seed=5)
    assert torch.equal(again(), a)  # seeded: the same draws
