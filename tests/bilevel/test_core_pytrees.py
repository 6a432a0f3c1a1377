r"""Shapes and types: tuple/dict/nested trees for x and y, constraint trees, nn.Module parameters,
float32, and CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import bilevel as bl

N_Y, N_X = 6, 5
BOUND = 0.5
LO = torch.tensor([-BOUND] * 4 + [-float("inf")] * 2, dtype=torch.float64)
HI = torch.tensor([BOUND] * 4 + [float("inf")] * 2, dtype=torch.float64)


def _flat_problem(device: str = "cpu"):
    r"""g(x, y) = 0.5 y'Hy + x'Cy + sum y^4/4 + sum(sin x) y_0 on flat x (5,), y (6,)."""
    Q, _ = torch.linalg.qr(torch.randn(N_Y, N_Y))
    H = (Q @ torch.diag(torch.linspace(1.0, 2.0, N_Y)) @ Q.T).to(device)
    C = (0.5 * torch.randn(N_X, N_Y)).to(device)
    t = torch.randn(N_Y).to(device)

    def g(x, y):
        return 0.5 * y @ H @ y + x @ C @ y + (y**4).sum() / 4 + torch.sin(x).sum() * y[0]

    def f(x, y):
        return ((y - t) ** 2).sum() + (x**2).sum()

    return g, f


# For each layout: x tree from flat x, flat x from x tree, y tree from flat y, flat y from y tree, constraint tree.
# Flat layout: x = (x[:3], x[3:]), y = (y[:4] as a 2x2 matrix, y[4:]); the box acts on y[:4] only.
LAYOUTS = {
    "tuple": (lambda x: (x[:3], x[3:]), lambda xt: torch.cat([xt[0], xt[1]]),
              lambda y: (y[:4].reshape(2, 2), y[4:]), lambda yt: torch.cat([yt[0].reshape(-1), yt[1]]),
              (bl.Box(-BOUND, BOUND), None)),
    "dict": (lambda x: {"b": x[3:], "a": x[:3]}, lambda xt: torch.cat([xt["a"], xt["b"]]),
             lambda y: {"w": y[:4].reshape(2, 2), "v": y[4:]}, lambda yt: torch.cat([yt["w"].reshape(-1), yt["v"]]),
             {"v": None, "w": bl.Box(-BOUND, BOUND)}),  # keys in another order than y's
    "nested": (lambda x: {"a": (x[:1], x[1:3]), "b": [x[3:]]}, lambda xt: torch.cat([*xt["a"], xt["b"][0]]),
               lambda y: {"p": (y[:4].reshape(2, 2), {"q": y[4:]})},
               lambda yt: torch.cat([yt["p"][0].reshape(-1), yt["p"][1]["q"]]),
               {"p": (bl.Box(-BOUND, BOUND), None)}),
}

STRATS = {
    "implicit-cg": lambda: bl.Implicit(bl.CG(maxiter=40)),
    "implicit-dense": lambda: bl.Implicit(bl.DenseSolve()),
    "unrolled": lambda: bl.Unrolled(),
    "linearized": lambda: bl.Linearized(step=0.2),
    "first-order": lambda: bl.FirstOrder(),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(STRATS))
def test_trees_match_the_flat_problem(layout, name):
    """The same problem on flat tensors (with a flat box whose last two coordinates are unbounded) and
    on trees (with a constraint tree that leaves the second leaf free) gives the same hypergradient."""
    g, f = _flat_problem()
    to_xt, x_of, to_yt, y_of, ctree = LAYOUTS[layout]
    x0, init = torch.randn(N_X), 0.1 * torch.randn(N_Y)
    steps = 100 if name.startswith("implicit") else 8
    flat = bl.LowerProblem(g, constraint=bl.Box(LO, HI), solver=bl.ProjectedGradient(0.2, steps))
    tree = bl.LowerProblem(lambda xt, yt: g(x_of(xt), y_of(yt)), constraint=ctree,
                           solver=bl.ProjectedGradient(0.2, steps))
    y_ref = bl.solve(flat, x0, init, bl.FirstOrder())
    y_tree = bl.solve(tree, to_xt(x0), to_yt(init), bl.FirstOrder())
    assert torch.allclose(y_of(y_tree), y_ref, rtol=0, atol=1e-14)
    boxed = y_ref[:4].abs() >= BOUND
    assert boxed.any() and (~boxed).any() and (y_ref[4:].abs() > BOUND).any(), "need active, free and unboxed parts"
    v_flat, g_flat = bl.value_and_hypergrad(f, flat, x0, init, STRATS[name]())
    v_tree, g_tree = bl.value_and_hypergrad(lambda xt, yt: f(x_of(xt), y_of(yt)), tree, to_xt(x0), to_yt(init),
                                            STRATS[name]())
    spec = torch.utils._pytree.tree_flatten
    assert spec(g_tree)[1] == spec(to_xt(x0))[1]  # the gradient has x's structure
    assert torch.allclose(v_tree, v_flat, rtol=1e-13)
    assert torch.allclose(x_of(g_tree), g_flat, rtol=1e-10, atol=1e-12)
    assert (g_flat - 2 * x0).abs().max() > 1e-3 or name == "first-order"


def test_nn_module_parameters_get_the_imaml_hypergradient():
    r"""x = dict(model.named_parameters()); y = adapted parameters (a dict); iMAML closed form on
    the augmented design [X, 1]: d L_val(w*)/d phi = lam (A + lam I)^-1 grad L_val(w*)."""
    d, lam = 3, 0.7
    model = nn.Linear(d, 1)
    Xt, yt, Xv, yv = torch.randn(12, d), torch.randn(12), torch.randn(9, d), torch.randn(9)

    def loss(params, X, t):
        return 0.5 * ((functional_call(model, params, (X,)).squeeze(-1) - t) ** 2).mean()

    def g(phi, w):
        return loss(w, Xt, yt) + 0.5 * lam * sum(((w[k] - phi[k]) ** 2).sum() for k in w)

    Za = torch.cat([Xt, torch.ones(12, 1)], 1)
    A = Za.T @ Za / 12
    L = float(torch.linalg.eigvalsh(A + lam * torch.eye(d + 1)).max())
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(1.0 / L, 400))
    phi = dict(model.named_parameters())
    init = {k: torch.zeros_like(p) for k, p in phi.items()}
    w = bl.solve(lower, phi, init, bl.Implicit(bl.CG(maxiter=20)))
    assert set(w) == {"weight", "bias"} and w["weight"].shape == (1, d)
    loss(w, Xv, yv).backward()
    phi_vec = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    w_opt = torch.linalg.solve(A + lam * torch.eye(d + 1), Za.T @ yt / 12 + lam * phi_vec)
    assert torch.allclose(torch.cat([w["weight"].detach().reshape(-1), w["bias"].detach()]), w_opt, atol=1e-12)
    Zv = torch.cat([Xv, torch.ones(9, 1)], 1)
    oracle = lam * torch.linalg.solve(A + lam * torch.eye(d + 1), Zv.T @ (Zv @ w_opt - yv) / 9)
    assert torch.allclose(model.weight.grad.reshape(-1), oracle[:d], rtol=1e-9, atol=1e-12)
    assert torch.allclose(model.bias.grad, oracle[d:], rtol=1e-9, atol=1e-12)


def _ridge(dtype):
    g64 = torch.Generator().manual_seed(7)
    X, yt = torch.randn(20, 5, generator=g64) / 20**0.5, torch.randn(20, generator=g64)
    Xv, yv = torch.randn(15, 5, generator=g64) / 15**0.5, torch.randn(15, generator=g64)
    lam = torch.exp(0.5 * torch.randn(5, generator=g64))
    A = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(A, X.T @ yt)
    oracle = -w * torch.linalg.solve(A, Xv.T @ (Xv @ w - yv))
    X_, yt_, Xv_, yv_ = (t.to(dtype) for t in (X, yt, Xv, yv))

    def g(lam_, w_):
        return 0.5 * ((X_ @ w_ - yt_) ** 2).sum() + 0.5 * (lam_ * w_**2).sum()

    def f(lam_, w_):
        return 0.5 * ((Xv_ @ w_ - yv_) ** 2).sum()

    return g, f, lam.to(dtype), oracle, float(torch.linalg.eigvalsh(A).max())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("name", ["implicit-cg", "implicit-dense", "unrolled"])
def test_float32_and_float64(dtype, tol, name):
    g, f, lam, oracle, lmax = _ridge(dtype)
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(1.0 / lmax, 300))
    x = lam.clone().requires_grad_()
    w = bl.solve(lower, x, torch.zeros(5, dtype=dtype), STRATS[name]())
    assert w.dtype == dtype
    f(x, w).backward()
    assert x.grad.dtype == dtype
    assert float((x.grad.double() - oracle).norm() / oracle.norm()) < tol


def test_float32_linearized_and_box():
    lower = bl.LowerProblem(lambda x, y: 0.5 * ((y - x) ** 2).sum(), constraint=bl.Box(-0.5, 0.5))
    x = torch.tensor([0.2, 0.9, -0.1], dtype=torch.float32, requires_grad=True)
    y = bl.solve(lower, x, torch.zeros(3, dtype=torch.float32), bl.Linearized(step=0.5, lam=4.0))
    assert y.dtype == torch.float32
    y.sum().backward()  # y = clamp(0.5 x): dy/dx = (1/lam) * mask
    assert torch.equal(x.grad, torch.full((3,), 0.25, dtype=torch.float32))
    x2 = torch.tensor([0.2, 1.4, -0.1], dtype=torch.float32, requires_grad=True)
    bl.solve(lower, x2, torch.zeros(3, dtype=torch.float32), bl.Linearized(step=0.5, lam=4.0)).sum().backward()
    assert torch.equal(x2.grad, torch.tensor([0.25, 0.0, 0.25], dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(STRATS))
def test_cuda_matches_cpu(name):
    torch.manual_seed(5)
    g, f = _flat_problem("cpu")
    torch.manual_seed(5)
    g_gpu, f_gpu = _flat_problem("cuda")
    x0, init = torch.randn(N_X), 0.1 * torch.randn(N_Y)
    cpu = bl.LowerProblem(g, constraint=bl.Box(LO, HI), solver=bl.ProjectedGradient(0.2, 30))
    gpu = bl.LowerProblem(g_gpu, constraint=bl.Box(LO.cuda(), HI.cuda()), solver=bl.ProjectedGradient(0.2, 30))
    _, ref = bl.value_and_hypergrad(f, cpu, x0, init, STRATS[name]())
    _, got = bl.value_and_hypergrad(f_gpu, gpu, x0.cuda(), init.cuda(), STRATS[name]())
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(STRATS))
def test_solver_output_with_another_dict_key_order(name):
    """A closed-form solver that builds its dict in another key order than init: the solution keeps
    each leaf under its own key (the implicit strategy re-orders the leaves to init's structure)."""
    A, B = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0, 30.0])

    def g(x, y):
        return 0.5 * ((y["a"] - x[0] * A) ** 2).sum() + 0.5 * ((y["b"] - x[1] * B) ** 2).sum()

    lower = bl.LowerProblem(g, solver=bl.ClosedForm(lambda x: {"b": x[1] * B, "a": x[0] * A}))
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    strategy = bl.Linearized(step=1.0) if name == "linearized" else STRATS[name]()
    y = bl.solve(lower, x, {"a": torch.zeros(2), "b": torch.zeros(3)}, strategy)
    assert torch.equal(y["a"].detach(), A) and torch.equal(y["b"].detach(), 2 * B)
    (y["a"].sum() + 2 * y["b"].sum()).backward()
    if name == "first-order":  # y* is a constant of x: an exact zero hypergradient
        assert torch.equal(x.grad, torch.zeros(2))
        return
    assert torch.allclose(x.grad, torch.stack([A.sum(), 2 * B.sum()]))
