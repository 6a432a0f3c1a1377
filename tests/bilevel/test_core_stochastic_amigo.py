r"""AmIGO: warm-started linear-system SGD (exact limit, unbiased steps, masked for boxes) and convergence to x*."""

from __future__ import annotations

import torch
from _stochastic_quadratic import assert_unbiased, minibatch_solve_loop, stochastic_quadratic

import bilevel as bl


def _full_batch():
    return None  # g(x, y, None) is the full objective


def _backward(P, strategy, x, y, w, constraint=None):
    """One outer step's backward: x.grad = d/dx <w, y*(x)> through the strategy, at the lower solution y."""
    lower = bl.LowerProblem(P.g, constraint=constraint, solver=bl.ClosedForm(lambda _: y))
    xx = x.clone().requires_grad_()
    (bl.solve(lower, xx, y, strategy) * w).sum().backward()
    return xx.grad


def test_warm_started_system_iterate_converges_to_the_exact_solution():
    """K = 3 steps per outer step cannot solve the system; warm-started across 30 outer steps they do."""
    P = stochastic_quadratic()
    x, w = torch.randn(3), torch.randn(6)
    y = P.y_star(x)
    amigo = bl.AmIGO(_full_batch, steps=3, step_size=0.5)
    for _ in range(30):
        grad = _backward(P, amigo, x, y, w)
    u_exact = torch.linalg.solve(P.A, w)
    assert torch.allclose(amigo.last_solution, u_exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad, -P.C @ u_exact, rtol=1e-10, atol=1e-12)  # the exact implicit hypergradient
    assert float(amigo.last_info.residual_norm) < 1e-10


def test_amigo_state_dict_restores_the_warm_start():
    P = stochastic_quadratic()
    x, w = torch.randn(3), torch.randn(6)
    y = P.y_star(x)
    amigo = bl.AmIGO(_full_batch, steps=2, step_size=0.5)
    for _ in range(3):
        _backward(P, amigo, x, y, w)
    resumed = bl.AmIGO(_full_batch, steps=2, step_size=0.5)
    resumed.load_state_dict(amigo.state_dict())
    assert torch.equal(_backward(P, resumed, x, y, w), _backward(P, amigo, x, y, w))
    fresh = bl.AmIGO(_full_batch, steps=2, step_size=0.5)
    assert not torch.allclose(_backward(P, fresh, x, y, w), _backward(P, amigo, x, y, w))


def test_amigo_steps_and_hypergradient_are_unbiased():
    """From a fixed warm start u0, E[u_K] is the full-batch K-step iterate and E[grad] = -C' E[u_K] (independent batches)."""
    P = stochastic_quadratic()
    gen = torch.Generator().manual_seed(3)
    x, w, u0 = torch.randn(3, generator=gen), torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    y = P.y_star(x)
    K, eta = 3, 0.3
    amigo = bl.AmIGO(bl.RandomBatches(P.N, 8, seed=4), steps=K, step_size=eta)
    us, grads = [], []
    for _ in range(300):
        amigo.last_solution = u0
        grads.append(_backward(P, amigo, x, y, w))
        us.append(amigo.last_solution)
    u = u0
    for _ in range(K):
        u = u - eta * (P.A @ u - w)
    assert_unbiased(torch.stack(us), u)
    # the cross term -grad^2_xy g(B') u: its mean is -(C + sigma (E[p q'] - M)) E[u] = -C E[u]
    assert_unbiased(torch.stack(grads), -P.C @ u)


def test_amigo_with_a_box_solves_the_masked_system():
    P = stochastic_quadratic()
    x, w = torch.randn(3), torch.randn(6)
    y = P.y_star(x)
    upper = torch.full((6,), 50.0)
    upper[2] = float(y[2])  # coordinate 2 on its bound: active (mask_tol > 0 counts it as active)
    amigo = bl.AmIGO(_full_batch, steps=5, step_size=0.5, mask_tol=1e-9)
    for _ in range(40):
        _backward(P, amigo, x, y, w, constraint=bl.Box(-50.0, upper))
    F = torch.tensor([0, 1, 3, 4, 5])
    u_exact = torch.zeros(6)
    u_exact[F] = torch.linalg.solve(P.A[F][:, F], w[F])
    assert torch.allclose(amigo.last_solution, u_exact, rtol=1e-10, atol=1e-12)


def test_minibatch_amigo_with_torch_optim_reaches_x_star():
    """The user's loop: TorchOptim SGD (5 warm-started steps), AmIGO (5 warm-started system steps), torch.optim on x."""
    P = stochastic_quadratic()
    err, amigo = minibatch_solve_loop(
        P, lambda batches: bl.AmIGO(batches, steps=5, step_size=0.3, residual=bl.ResidualCheck(step=0.3)), 300)
    assert err < 0.08
    # the residual diagnostic is a device tensor: the full-batch residual of the final iterate, unread in the loop
    assert amigo.last_residual.ndim == 0 and float(amigo.last_residual) > 0
