r"""TorchOptim: torch.optim optimizers as lower solvers (full batch and mini-batches), under Implicit."""

from __future__ import annotations

import warnings

import pytest
import torch
from _quadratic import quadratic
from torch.utils.data import DataLoader, TensorDataset

import bilevel as bl


def _ridge(n: int = 40, d: int = 5):
    X, t = torch.randn(n, d), torch.randn(n)
    Xv, tv = torch.randn(20, d), torch.randn(20)

    def g(lam, w, batch=None):
        Xb, tb = (X, t) if batch is None else batch
        return 0.5 * ((Xb @ w - tb) ** 2).sum() * (n / Xb.shape[0]) + 0.5 * (torch.exp(lam) * w**2).sum()

    def f(lam, w):
        return 0.5 * ((Xv @ w - tv) ** 2).sum()

    def closed_form(lam):
        Hm = X.T @ X + torch.diag(torch.exp(lam))
        w = torch.linalg.solve(Hm, X.T @ t)
        u = torch.linalg.solve(Hm, Xv.T @ (Xv @ w - tv))
        return w, -w * u * torch.exp(lam)  # dF/dlam_i = -w_i u_i e^{lam_i} (chain rule through exp)

    return X, t, g, f, closed_form


@pytest.mark.parametrize("optimizer,options,steps,tol", [(torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}, 400, 1e-6),
                                                         (torch.optim.Adam, {"lr": 0.05}, 1500, 1e-4)],
                         ids=["sgd-momentum", "adam"])
def test_torch_optim_reaches_ridge_closed_form_and_implicit_matches_the_hypergradient(optimizer, options, steps, tol):
    """Adam with a constant learning rate hovers around the minimizer: a looser (stated) tolerance."""
    X, t, g, f, closed_form = _ridge()
    lam = torch.full((5,), 0.5, requires_grad=True)
    lower = bl.LowerProblem(g, solver=bl.TorchOptim(optimizer, steps, **options))
    w = bl.solve(lower, lam, torch.zeros(5), bl.Implicit(bl.CG(maxiter=10)))
    w_ref, grad_ref = closed_form(lam.detach())
    assert float((w.detach() - w_ref).norm() / w_ref.norm()) < tol
    f(lam, w).backward()
    assert float((lam.grad - grad_ref).norm() / grad_ref.norm()) < 10 * tol


def test_minibatch_steps_from_a_dataloader_equal_a_hand_written_loop():
    X, t, g, _, _ = _ridge()
    loader = DataLoader(TensorDataset(X, t), batch_size=8, shuffle=False)
    lam = torch.zeros(5)
    solver = bl.TorchOptim(torch.optim.SGD, 12, batches=loader, lr=0.002, momentum=0.5)
    w = solver.run(bl.LowerProblem(g), lam, torch.zeros(5))
    ref = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([ref], lr=0.002, momentum=0.5)
    batches = list(loader) * 3  # 12 steps cycle over the 5 batches of one pass
    for k in range(12):
        opt.zero_grad()
        g(lam, ref, batches[k]).backward()
        opt.step()
    assert torch.allclose(w, ref.detach(), rtol=1e-13, atol=1e-15)


def test_box_constrained_torch_optim_keeps_active_set_exactness():
    q = quadratic(n=5, m=3)
    x = torch.randn(3, requires_grad=True)
    y_free = q.y_star(x.detach())
    # an upper bound just below one coordinate of the free solution makes that coordinate active
    k = int(torch.argmax(y_free))
    upper = torch.full((5,), 10.0)
    upper[k] = float(y_free[k]) - 0.5
    lower = bl.LowerProblem(q.g, constraint=bl.Box(-10.0, upper),
                            solver=bl.TorchOptim(torch.optim.SGD, 600, lr=0.2, momentum=0.5))
    y = bl.solve(lower, x, torch.zeros(5), bl.Implicit(bl.DenseSolve()))
    free = torch.ones(5, dtype=torch.bool)
    free[k] = False
    assert float(y.detach()[k]) == float(upper[k])
    # closed form on the free set with y_k fixed at its bound
    F = free.nonzero().squeeze(1)
    rhs = (q.C.T @ x.detach() + q.a0)[F] + q.H[F, k] * upper[k]
    y_F = -torch.linalg.solve(q.H[F][:, F], rhs)
    assert torch.allclose(y.detach()[F], y_F, atol=1e-10)
    w = torch.randn(5)
    (y * w).sum().backward()
    oracle = -q.C[:, F] @ torch.linalg.solve(q.H[F][:, F], w[F])
    assert torch.allclose(x.grad, oracle, rtol=1e-10, atol=1e-12)


def test_torch_optim_refuses_unrolled_and_bad_input():
    q = quadratic()
    lower = bl.LowerProblem(q.g, solver=bl.TorchOptim(torch.optim.SGD, 5, lr=0.1))
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="Unrolled"):
        bl.solve(lower, x, torch.zeros(4), bl.Unrolled())
    with pytest.raises(ValueError, match="steps"):
        bl.TorchOptim(torch.optim.SGD, -1, lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        bl.TorchOptim("sgd", 5)
    with pytest.raises(TypeError, match="batch source"):
        bl.TorchOptim(torch.optim.SGD, 5, batches=3, lr=0.1)
    assert "SGD" in repr(lower.solver) and "lr=0.1" in repr(lower.solver)


def test_torch_optim_works_under_grad_and_is_refused_by_name_under_vmap():
    """torch.func.grad gives the closed form, as autograd does; under vmap (even below grad, or over the data only)
    a clear TypeError instead of functorch's requires_grad_ error."""
    X, t, g, f, closed_form = _ridge()
    lower = bl.LowerProblem(g, solver=bl.TorchOptim(torch.optim.SGD, 400, lr=0.01, momentum=0.9))
    F = lambda lam: f(lam, bl.solve(lower, lam, torch.zeros(5), bl.Implicit(bl.CG(maxiter=10))))
    lam = torch.full((5,), 0.5)
    got = torch.func.grad(F)(lam)
    assert float((got - closed_form(lam)[1]).norm() / closed_form(lam)[1].norm()) < 1e-5
    for batched in (torch.func.vmap(F), torch.func.vmap(torch.func.grad(F)),
                    torch.func.vmap(lambda s: F(lam) * s)):
        with pytest.raises(TypeError, match="TorchOptim under vmap"):
            batched(torch.rand(3, 5) + 0.5)


def test_lbfgs_takes_its_closure_and_reaches_the_closed_form():
    """LBFGS needs a closure (it evaluates g several times per step): TorchOptim gives it one, on one batch per step."""
    X, t, g, f, closed_form = _ridge()
    lam = torch.full((5,), 0.5, requires_grad=True)
    lower = bl.LowerProblem(g, solver=bl.TorchOptim(torch.optim.LBFGS, 5, lr=1.0, max_iter=20,
                                                    line_search_fn="strong_wolfe"))
    w = bl.solve(lower, lam, torch.zeros(5), bl.Implicit(bl.CG(maxiter=10)))
    w_ref, grad_ref = closed_form(lam.detach())
    assert float((w.detach() - w_ref).norm() / w_ref.norm()) < 1e-5
    f(lam, w).backward()
    assert float((lam.grad - grad_ref).norm() / grad_ref.norm()) < 1e-4


@pytest.mark.parametrize("optimizer,options", [(torch.optim.Adamax, {"lr": 0.05}), (torch.optim.ASGD, {"lr": 0.01})],
                         ids=["adamax", "asgd"])
def test_an_l2_weight_decay_is_part_of_the_differentiated_objective(optimizer, options):
    """Optimizers that add omega * y to the gradient minimize g + omega/2 |y|^2: Implicit differentiates that (the
    closed form of a ridge whose penalty is exp(lam) + omega), silently."""
    X, t, g, f, _ = _ridge()
    lam = torch.full((5,), 0.5, requires_grad=True)
    omega = 0.7
    lower = bl.LowerProblem(g, solver=bl.TorchOptim(optimizer, 3000, weight_decay=omega, **options))
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.HypergradientWarning)
        w = bl.solve(lower, lam, torch.zeros(5), bl.Implicit(bl.CG(maxiter=10), check=None))
    Hm = X.T @ X + torch.diag(torch.exp(lam.detach()) + omega)
    w_ref = torch.linalg.solve(Hm, X.T @ t)
    assert float((w.detach() - w_ref).norm() / w_ref.norm()) < 1e-3
    f(lam, w).backward()
    u = torch.linalg.solve(Hm, torch.func.grad(lambda ww: f(lam.detach(), ww))(w_ref))
    expected = -w_ref * u * torch.exp(lam.detach())
    assert float((lam.grad - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.parametrize("optimizer,options", [(torch.optim.AdamW, {"lr": 0.05}),
                                               (torch.optim.NAdam, {"lr": 0.05, "weight_decay": 0.1,
                                                                    "decoupled_weight_decay": True})],
                         ids=["adamw-default-decay", "nadam-decoupled"])
def test_a_decoupled_weight_decay_is_reported_once(optimizer, options):
    """AdamW decays by 0.01 even when the user sets nothing: its fixed point does not minimize g, so the
    hypergradient is biased; a HypergradientWarning says so, once per solver."""
    X, t, g, f, _ = _ridge()
    solver = bl.TorchOptim(optimizer, 50, **options)
    lower = bl.LowerProblem(g, solver=solver)
    lam = torch.full((5,), 0.5, requires_grad=True)
    with pytest.warns(bl.HypergradientWarning, match=r"decoupled from the gradient.*put the L2 term into g"):
        bl.solve(lower, lam, torch.zeros(5), bl.Implicit(check=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.HypergradientWarning)
        bl.solve(lower, lam, torch.zeros(5), bl.Implicit(check=None))


def test_lbfgs_with_a_constraint_and_decays_bilevel_cannot_see_are_named():
    """LBFGS's inner iterations ignore a constraint: refused. A decay set inside a factory is invisible to
    minimized(): reported. A subclass of an L2-decay optimizer keeps its L2 term, silently."""
    X, t, g, f, _ = _ridge()
    lam = torch.full((5,), 0.5, requires_grad=True)
    boxed = bl.LowerProblem(g, constraint=bl.Box(-0.05, 0.05), solver=bl.TorchOptim(torch.optim.LBFGS, 3))
    with pytest.raises(TypeError, match="LBFGS.*with a constraint"):
        bl.solve(boxed, lam, torch.zeros(5), bl.Implicit())
    factory = bl.TorchOptim(lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=0.1), 10)
    with pytest.warns(bl.HypergradientWarning, match="set inside an optimizer factory"):
        bl.solve(bl.LowerProblem(g, solver=factory), lam, torch.zeros(5), bl.Implicit(check=None))

    class MyAdam(torch.optim.Adam):
        pass

    mine = bl.TorchOptim(MyAdam, 10, lr=0.01, weight_decay=0.1)
    assert mine.minimized(bl.LowerProblem(g, solver=mine)).objective is not g
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.HypergradientWarning)
        bl.solve(bl.LowerProblem(g, solver=mine), lam, torch.zeros(5), bl.Implicit(check=None))


def test_first_order_over_torch_optim_returns_the_ridge_solution_as_a_constant():
    _, _, g, f, closed_form = _ridge()
    lam = torch.full((5,), 0.5, requires_grad=True)
    lower = bl.LowerProblem(g, solver=bl.TorchOptim(torch.optim.SGD, 400, lr=0.01, momentum=0.9))
    w = bl.solve(lower, lam, torch.zeros(5), bl.FirstOrder())
    w_ref, _ = closed_form(lam.detach())
    assert float((w - w_ref).norm() / w_ref.norm()) < 1e-6
    assert torch.equal(torch.autograd.grad(w.sum(), lam)[0], torch.zeros(5))  # a constant of lam
