r"""Central finite differences (float64) on the small nonlinear MLP lower problem, for every strategy.

Each strategy is compared with the finite differences of the function it claims to differentiate:
Implicit with F(x) = f(x, y*(x)) (y* solved to machine precision), Unrolled with f(x, y_K(x)),
Linearized with f(x, Proj_C(z - step grad_y g(x, z))), FirstOrder with f(x, y) for y held fixed.
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

H_FD = 1e-5


def central_diff(fn, x: torch.Tensor, h: float = H_FD) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = h
        out.view(-1)[i] = (fn(x + e) - fn(x - e)) / (2 * h)
    return out


def hypergrad(f, lower, x0, init, strategy) -> torch.Tensor:
    x = x0.clone().requires_grad_()
    f(x, bl.solve(lower, x, init, strategy)).backward()
    return x.grad


@pytest.mark.parametrize("linear_solver", [bl.CG(maxiter=40), bl.DenseSolve()], ids=["cg", "dense"])
def test_implicit_vs_fd(mlp_problem, linear_solver):
    P = mlp_problem
    lower = P.lower(120)
    w_opt = bl.solve(lower, P.x0, P.init, bl.FirstOrder())
    _, gw = lower.value_and_grad(P.x0, w_opt)
    assert max(float(t.abs().max()) for t in gw.values()) < 1e-13  # solved to machine precision
    warm = P.lower(60)  # the finite-difference solves start at w*(x0)
    fd = central_diff(lambda x: P.f(x, bl.solve(warm, x, w_opt, bl.FirstOrder())), P.x0)
    hg = hypergrad(P.f, lower, P.x0, P.init, bl.Implicit(linear_solver))
    assert (hg - 0.1 * torch.cos(P.x0)).abs().max() > 1e-4  # the implicit term is not negligible
    assert torch.allclose(hg, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("truncate", [None, 3])
def test_unrolled_vs_fd(mlp_problem, truncate):
    P, K = mlp_problem, 8
    lower = P.lower(K)
    if truncate is None:
        def F_of(x):
            return P.f(x, bl.solve(lower, x, P.init, bl.FirstOrder()))
    else:  # truncation: the first K - T iterates are constants computed at x0
        mid = bl.solve(P.lower(K - truncate), P.x0, P.init, bl.FirstOrder())

        def F_of(x):
            return P.f(x, bl.solve(P.lower(truncate), x, mid, bl.FirstOrder()))
    fd = central_diff(F_of, P.x0)
    hg = hypergrad(P.f, lower, P.x0, P.init, bl.Unrolled(truncate=truncate))
    assert torch.allclose(hg, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("lam", [None, 3.0])
def test_linearized_vs_fd_of_its_closed_form(mlp_problem, lam):
    P, step = mlp_problem, 0.5
    box = bl.Box(-0.15, 0.15)
    lower = bl.LowerProblem(P.g, constraint=box)
    z = P.init

    def closed_form(x, s=step):
        _, gz = lower.value_and_grad(x, z)
        return {k: box.project(z[k] - s * gz[k]) for k in z}

    _, gz = lower.value_and_grad(P.x0, z)
    u = torch.cat([(z[k] - step * gz[k]).reshape(-1) for k in z])
    dist = torch.minimum((u - 0.15).abs(), (u + 0.15).abs())
    assert bool((u.abs() < 0.15).any()) and bool((u.abs() > 0.15).any())
    assert float(dist.min()) > 1e-3  # no coordinate within finite-difference reach of a kink
    hg = hypergrad(P.f, lower, P.x0, z, bl.Linearized(step=step, lam=lam))
    fd = central_diff(lambda x: P.f(x, closed_form(x)), P.x0)
    if lam is None:
        assert torch.allclose(hg, fd, rtol=1e-6, atol=1e-9)
    else:  # value at `step`, derivative with 1/lam instead of step: the implicit part scales by 1/(lam step)
        direct = 0.1 * torch.cos(P.x0)
        assert torch.allclose(hg, direct + (fd - direct) / (lam * step), rtol=1e-6, atol=1e-9)
        assert (hg - fd).abs().max() > 1e-4


def test_first_order_vs_fd_with_y_fixed(mlp_problem):
    P = mlp_problem
    lower = P.lower(30)
    y = bl.solve(lower, P.x0, P.init, bl.FirstOrder())
    fd = central_diff(lambda x: P.f(x, y), P.x0)
    hg = hypergrad(P.f, lower, P.x0, P.init, bl.FirstOrder())
    assert torch.allclose(hg, fd, rtol=1e-6, atol=1e-10)
