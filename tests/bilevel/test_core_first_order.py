r""":class:`bilevel.FirstOrder`: an exact zero hypergradient through :math:`y^\star`, and first-order MAML
(``through_init=True``) against its definition, the query gradient at the adapted weights."""

from __future__ import annotations

import torch

import bilevel as bl


def _maml_problem():
    X, Y = torch.randn(20, 3), torch.randn(20)

    def g(theta, w):
        return 0.5 * ((X[:10] @ w - Y[:10]) ** 2).mean() + 0.5 * ((w - theta) ** 2).sum()

    def f(w):
        return 0.5 * ((X[10:] @ w - Y[10:]) ** 2).mean()

    return bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 50)), f


def test_an_upper_objective_through_y_only_gets_an_exact_zero():
    """iMAML's query loss depends on theta only through w: x.grad is zeros, not PyTorch's 'does not require grad'."""
    lower, f = _maml_problem()
    theta = torch.randn(3, requires_grad=True)
    f(bl.solve(lower, theta, torch.zeros(3), bl.FirstOrder())).backward()
    assert torch.equal(theta.grad, torch.zeros(3))
    value, grad = bl.value_and_hypergrad(lambda th, w: f(w), lower, theta, torch.zeros(3), bl.FirstOrder())
    assert torch.equal(grad, torch.zeros(3))


def test_fomaml_is_the_query_gradient_at_the_adapted_weights():
    lower, f = _maml_problem()
    theta = torch.randn(3, requires_grad=True)
    w = bl.solve(lower, theta, theta, bl.FirstOrder(through_init=True))
    f(w).backward()
    w_ref = lower.solver.run(lower, theta.detach(), theta.detach()).requires_grad_()
    (expected,) = torch.autograd.grad(f(w_ref), w_ref)
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=0, atol=0)  # the same solver run replayed
    torch.testing.assert_close(theta.grad, expected, rtol=1e-13, atol=1e-15)
    # and under torch.func, as a meta-batch would take it
    got = torch.func.grad(lambda th: f(bl.solve(lower, th, th, bl.FirstOrder(through_init=True))))(theta.detach())
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


def test_without_a_graph_nothing_is_attached():
    lower, f = _maml_problem()
    with torch.no_grad():
        w = bl.solve(lower, torch.randn(3, requires_grad=True), torch.zeros(3), bl.FirstOrder())
    assert not w.requires_grad and w.grad_fn is None
