r""":class:`bilevel.SGD`: ``torch.optim.SGD``'s update (momentum, weight decay, dampening, Nesterov, a batch per
step), differentiable; unrolled hypergradients against ``torch.func`` through a hand-written loop, and DARTS's
second-order step against its published formula (float64)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

OPTIONS = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "momentum-wd": dict(momentum=0.9, weight_decay=3e-4),
    "dampening": dict(momentum=0.5, dampening=0.3),
    "nesterov-wd": dict(momentum=0.8, nesterov=True, weight_decay=1e-2),
}


def _g(X, Y):
    return lambda x, w: 0.5 * ((torch.tanh(X @ w) - Y) ** 2).mean() + 0.5 * (torch.exp(x) * w * w).sum()


def _hand_sgd(g, x, w, lr, steps, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
    """torch.optim.SGD's documented update, with torch.func gradients (differentiable in x)."""
    buf = None
    for _ in range(steps):
        d = torch.func.grad(g, argnums=1)(x, w) + weight_decay * w
        if momentum:
            buf = d if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        w = w - lr * d
    return w


@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_iterates_are_torch_optim_sgd(name):
    g, x, w0 = _g(torch.randn(16, 3), torch.randn(16)), torch.randn(3), torch.randn(3)
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([w], lr=0.1, **OPTIONS[name])
    for _ in range(7):
        opt.zero_grad()
        g(x, w).backward()
        opt.step()
    ours = bl.SGD(0.1, 7, **OPTIONS[name]).run(bl.LowerProblem(g), x, w0)
    torch.testing.assert_close(ours, w.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_unrolled_hypergradient_equals_func_through_the_hand_written_loop(name):
    g, x0, w0 = _g(torch.randn(16, 3), torch.randn(16)), 0.1 * torch.randn(3), torch.randn(3)
    f = lambda x, w: ((w - 1.0) ** 2).sum() + x.sum()
    lower = bl.LowerProblem(g, solver=bl.SGD(0.2, 6, **OPTIONS[name]))
    got = torch.func.grad(lambda x: f(x, bl.solve(lower, x, w0, bl.Unrolled())))(x0)
    ref = torch.func.grad(lambda x: f(x, _hand_sgd(g, x, w0, 0.2, 6, **OPTIONS[name])))(x0)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    x = x0.clone().requires_grad_()
    f(x, bl.solve(lower, x, w0, bl.Unrolled())).backward()
    torch.testing.assert_close(x.grad, ref, rtol=1e-10, atol=1e-13)


def test_each_step_draws_a_fresh_batch_and_stays_differentiable():
    X, Y = torch.randn(4, 16, 3), torch.randn(4, 16)
    draws = iter(range(1000))
    g = lambda x, w, b: 0.5 * ((X[b] @ w - Y[b]) ** 2).mean() + 0.5 * (torch.exp(x) * w * w).sum()
    lower = bl.LowerProblem(g, solver=bl.SGD(0.1, 8, momentum=0.9, batches=lambda: next(draws) % 4))
    x0, w0 = torch.zeros(3), torch.zeros(3)
    got = torch.func.grad(lambda x: bl.solve(lower, x, w0, bl.Unrolled()).sum())(x0)

    def loop(x):
        w, buf = w0, None
        for k in range(8):  # the solve above drew batches 0..7 in order
            d = torch.func.grad(lambda w, k=k: g(x, w, k % 4))(w)
            buf = d if buf is None else 0.9 * buf + d
            w = w - 0.1 * buf
        return w.sum()

    torch.testing.assert_close(got, torch.func.grad(loop)(x0), rtol=1e-10, atol=1e-13)


def test_a_darts_second_order_step_is_the_published_update():
    r"""DARTS (Liu et al., 2019, Eq. 7) with the network optimizer's momentum buffer :math:`b` and weight decay
    :math:`\omega`: :math:`w' = w - \xi(\mu b + \nabla_w L_{tr}(w, \alpha) + \omega w)` and
    :math:`\nabla_\alpha L_{val}(w', \alpha) - \xi \nabla^2_{\alpha w} L_{tr}(w, \alpha) \nabla_{w'} L_{val}(w', \alpha)`.
    The library's step: one SGD step with weight decay (Unrolled), or Linearized, on :math:`L_{tr} + \langle \mu b, w\rangle`."""
    X, Y, Xv, Yv = torch.randn(20, 4), torch.randn(20), torch.randn(10, 4), torch.randn(10)
    train = lambda a, w: ((torch.tanh(X @ (w * torch.softmax(a, 0))) - Y) ** 2).mean()
    val = lambda a, w: ((torch.tanh(Xv @ (w * torch.softmax(a, 0))) - Yv) ** 2).mean() + 0.1 * (a ** 2).sum()
    alpha, w, b = torch.randn(4), torch.randn(4), torch.randn(4)
    xi, mu, wd = 0.05, 0.9, 3e-4
    # the published update, term by term (exact second-order products)
    w1 = w - xi * (mu * b + torch.func.grad(train, argnums=1)(alpha, w) + wd * w)
    dval_a, dval_w = torch.func.grad(val, argnums=(0, 1))(alpha, w1)
    mixed = torch.func.grad(lambda a: torch.dot(torch.func.grad(train, argnums=1)(a, w), dval_w))(alpha)
    darts = dval_a - xi * mixed
    g = lambda a, v: train(a, v) + torch.dot(mu * b, v)
    g_wd = lambda a, v: g(a, v) + 0.5 * wd * (v * v).sum()
    for strategy, lower in [(bl.Unrolled(), bl.LowerProblem(g, solver=bl.SGD(xi, 1, weight_decay=wd))),
                            (bl.Linearized(step=xi), bl.LowerProblem(g_wd))]:
        got = torch.func.grad(lambda a, lower=lower, strategy=strategy: val(a, bl.solve(lower, a, w, strategy)))(alpha)
        torch.testing.assert_close(got, darts, rtol=1e-10, atol=1e-13)
    # DARTS's finite difference: epsilon = 0.01 / ||v||, i.e. the point moves a distance 0.01
    lin = bl.Linearized(step=xi, products=bl.CentralDifference(distance=0.01))
    fd = torch.func.grad(lambda a: val(a, bl.solve(bl.LowerProblem(g_wd), a, w, lin)))(alpha)
    eps = 0.01 / dval_w.norm()
    ga = lambda v: torch.func.grad(train)(alpha, v)
    published_fd = dval_a - xi * (ga(w + eps * dval_w) - ga(w - eps * dval_w)) / (2 * eps)
    torch.testing.assert_close(fd, published_fd, rtol=1e-9, atol=1e-12)
    assert 0 < (fd - darts).abs().max() < 1e-4  # an approximation, close to the exact step on this smooth supernet


@pytest.mark.parametrize("bad", [dict(momentum=1.0), dict(momentum=-0.1), dict(weight_decay=float("nan")),
                                 dict(dampening=2.0), dict(nesterov=True), dict(step_size=0.0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="SGD"):
        bl.SGD(**{"step_size": 0.1, "steps": 3, **bad})


def test_distance_is_exclusive_with_h_and_scale():
    with pytest.raises(ValueError, match="give one of"):
        bl.CentralDifference(h=1e-3, distance=0.01)
    with pytest.raises(ValueError, match="distance"):
        bl.ForwardDifference(distance=-1.0)


@pytest.mark.parametrize("make", [lambda wd: bl.SGD(0.2, 400, momentum=0.5, weight_decay=wd),
                                  lambda wd: bl.Adam(0.02, 1500, weight_decay=wd),
                                  lambda wd: bl.TorchOptim(torch.optim.SGD, 400, lr=0.2, weight_decay=wd)],
                         ids=["sgd", "adam", "torch-optim-sgd"])
def test_implicit_differentiates_the_problem_the_weight_decay_solves(make):
    """A solver with weight decay omega converges to a stationary point of g + omega/2 |w|^2, not of g: Implicit
    differentiates that problem (against the closed form on ridge regression, float64)."""
    X, Y, Xv, Yv = torch.randn(30, 4), torch.randn(30), torch.randn(20, 4), torch.randn(20)
    g = lambda lam, w: 0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (lam * w * w).sum()
    f = lambda w: 0.5 * ((Xv @ w - Yv) ** 2).mean()
    wd, lam = 0.3, torch.full((4,), 0.1, requires_grad=True)
    f(bl.solve(bl.LowerProblem(g, solver=make(wd)), lam, torch.zeros(4), bl.Implicit(bl.DenseSolve()))).backward()
    A = X.T @ X / 30 + torch.diag(lam.detach() + wd)
    w = torch.linalg.solve(A, X.T @ Y / 30)
    exact = -w * torch.linalg.solve(A, Xv.T @ (Xv @ w - Yv) / 20)
    torch.testing.assert_close(lam.grad, exact, rtol=1e-8, atol=1e-10)
