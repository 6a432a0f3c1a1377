r"""The Betty adapter (bilevel.integrations.betty) against the native ``bilevel`` path and closed forms.

1. Fast-BAT written as two Betty problems (upper: a tiny classifier trained at x + delta*; lower: the
   perturbation, projected onto the L-inf ball ∩ the [0, 1] box after each step) run by a Betty Engine gives
   the same upper gradient as ``bilevel.solve(..., Linearized)`` + autograd, to float64 precision, for the
   exact implicit gradient (lam = 1/step), a decoupled lam and no implicit gradient (lam = inf).
2. Per-feature ridge regression as Betty problems with ``bilevel.Implicit(CG)`` registered: the closed-form
   hypergradient, where Betty's own ``cg`` is off; and the active-set hypergradient of a box-constrained
   quadratic (closed form dy_F/dx = H_FF^-1 B_F).
3. The adapter imports without Betty and says what to install.

Skipped when betty (betty-ml 0.2.1) is not importable.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from bilevel.integrations import betty as adapter

if not adapter.betty_available():
    pytest.skip("betty-ml is not installed (pip install --no-deps --ignore-requires-python betty-ml==0.2.1)",
                allow_module_level=True)

with warnings.catch_warnings():  # betty imports torch.distributed.optim, which warns about torch.jit on torch 2.x
    warnings.simplefilter("ignore", DeprecationWarning)
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.hypergradient import get_grads
    from betty.problems import ImplicitProblem

DT = torch.float64


@pytest.fixture
def registered():
    names = []

    def reg(strategy: bl.Strategy) -> str:
        name = f"bilevel_test_{len(names)}"
        adapter.register(name, strategy, overwrite=True)
        names.append(name)
        return name

    yield reg
    for n in names:
        adapter.unregister(n)


class Perturbation(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(init.clone())


def _tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Softplus(), nn.Linear(7, 3)).to(DT)


def _fastbat_batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 3, 2, 2, generator=gen, dtype=DT)
    x[0, 0, 0, 0], x[1, 1, 1, 1] = 0.0, 1.0  # pixels at the box bounds: the box part of C is active there
    y = torch.randint(0, 3, (5,), generator=gen)
    z0 = (torch.rand(5, 3, 2, 2, generator=gen, dtype=DT) * 2 - 1) * 0.1
    return x, y, z0


def _native_fastbat_grad(model: nn.Module, x, y, z0, eps: float, step: float, lam):
    """bilevel's own path: z = one projected step from z0 (no graph); delta* = solve(Linearized); backward."""
    params = dict(model.named_parameters())
    constraint = bl.LInfBall(0.0, eps) & bl.Box(-x, 1 - x)

    def g(w, d):
        return -F.cross_entropy(torch.func.functional_call(model, w, (x + d,)), y, reduction="sum")

    lower = bl.LowerProblem(objective=g, constraint=constraint, solver=bl.ProjectedGradient(step_size=step, steps=1))
    z = bl.solve(lower, params, constraint.project(z0), bl.FirstOrder())
    delta = bl.solve(lower, params, z, bl.Linearized(step=step, lam=lam))
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x + delta,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return [g.detach() for g in grads], delta.detach()


def _betty_fastbat_grad(model: nn.Module, x, y, z0, eps: float, step: float, hyper_type: str):
    """The same program as Betty problems run by an Engine; returns the upper .grad before its optimizer step."""
    batch = [(x, y)]
    record = {}

    class Attack(adapter.ConstrainedProblem, ImplicitProblem):
        def get_constraint(self, batch):
            xb, _ = batch
            return bl.LInfBall(0.0, eps, check=False) & bl.Box(-xb, 1 - xb, check=False)

        def on_inner_loop_start(self):
            with torch.no_grad():
                self.module.delta.copy_(z0)
            self.cur_batch = batch[0]
            self.project_()

        def training_step(self, batch):
            xb, yb = batch
            return -F.cross_entropy(self.classifier(xb + self.module.delta), yb, reduction="sum")

    class Classifier(ImplicitProblem):
        def training_step(self, batch):
            xb, yb = batch
            return F.cross_entropy(self.module(xb + self.attack.module.delta), yb)

        def grad_callback(self):
            record["grads"] = [p.grad.detach().clone() for p in self.trainable_parameters()]
            record["delta"] = self.attack.module.delta.detach().clone()

    delta_module = Perturbation(torch.zeros_like(x))
    attack = Attack("attack", Config(type=hyper_type, unroll_steps=2), module=delta_module,
                    optimizer=torch.optim.SGD(delta_module.parameters(), lr=step), train_data_loader=batch)
    classifier = Classifier("classifier", Config(type="darts", retain_graph=True), module=model,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data_loader=batch)
    engine = Engine(problems=[classifier, attack], config=EngineConfig(train_iters=2, strategy="cpu"),
                    dependencies={"u2l": {classifier: [attack]}, "l2u": {attack: [classifier]}})
    engine.run()
    return record["grads"], record["delta"]


@pytest.mark.parametrize("lam", [None, 0.5, math.inf], ids=["exact-IG", "lam=0.5", "no-IG"])
def test_fastbat_in_betty_engine_matches_native_linearized(registered, lam):
    x, y, z0 = _fastbat_batch()
    eps, step = 0.2, 3.0
    name = registered(bl.Linearized(step=step, lam=lam))

    native, delta_native = _native_fastbat_grad(_tiny_classifier(), x, y, z0, eps, step, lam)
    via_betty, delta_betty = _betty_fastbat_grad(_tiny_classifier(), x, y, z0, eps, step, name)

    # the lower iterates agree, and some coordinates sit on each kind of bound (the mask matters)
    torch.testing.assert_close(delta_betty, delta_native, rtol=0, atol=1e-12)
    assert bool((delta_native.abs() >= eps - 1e-12).any())
    assert bool(((x + delta_native) <= 1e-12).any() or ((x + delta_native) >= 1 - 1e-12).any())
    for a, b in zip(via_betty, native):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fastbat_implicit_term_is_nonzero_and_scales_with_lambda(registered):
    """Guards the comparison above against a vanishing implicit term: the IG differs between lam values."""
    x, y, z0 = _fastbat_batch()
    eps, step = 0.2, 3.0
    grads = {}
    for lam in (None, math.inf):
        name = registered(bl.Linearized(step=step, lam=lam))
        grads[lam], _ = _betty_fastbat_grad(_tiny_classifier(), x, y, z0, eps, step, name)
    diff = sum(float((a - b).norm()) for a, b in zip(grads[None], grads[math.inf]))
    total = sum(float(a.norm()) for a in grads[math.inf])
    assert diff > 1e-3 * total


class _Holder(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value.clone())


def _ridge(d: int = 6, n: int = 30, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT) * torch.logspace(0, -1, d, dtype=DT)
    Xv = torch.randn(n, d, generator=gen, dtype=DT)
    yt, yv = torch.randn(n, generator=gen, dtype=DT), torch.randn(n, generator=gen, dtype=DT)
    lam = 0.05 + torch.rand(d, generator=gen, dtype=DT)
    H = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ yt)
    grad_true = -w * torch.linalg.solve(H, Xv.T @ (Xv @ w - yv))
    return X, yt, Xv, yv, lam, w, grad_true


def _ridge_betty_hypergrad(hyper_type: str, **cfg):
    """Betty's get_grads on upper -> lower -> upper at the exact lower solution (the ridge w*)."""
    X, yt, Xv, yv, lam, w, grad_true = _ridge()

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            r = Xv @ self.lower.module.value - yv
            return 0.5 * (r @ r)

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            r = X @ self.module.value - yt
            return 0.5 * (r @ r) + 0.5 * (self.upper.module.value * self.module.value ** 2).sum()

    upper = Upper("upper", Config(type="darts", retain_graph=True), module=_Holder(lam))
    lower = Lower("lower", Config(type=hyper_type, **cfg), module=_Holder(w))
    upper.lower, lower.upper, lower.cur_batch = lower, upper, None
    got = get_grads(upper.training_step(None), [upper, lower, upper], retain_graph=False, do_sync=False)[0]
    return got, grad_true


def test_ridge_implicit_cg_registered_in_betty_matches_closed_form(registered):
    name = registered(bl.Implicit(linear_solver=bl.CG(maxiter=30)))
    got, true = _ridge_betty_hypergrad(name)
    torch.testing.assert_close(got, true, rtol=1e-9, atol=1e-12)
    # Betty 0.2.1's own cg at the same iteration count is not (its direction update uses the old residual)
    betty_cg, _ = _ridge_betty_hypergrad("cg", cg_iterations=30)
    assert float((betty_cg - true).norm() / true.norm()) > 1e-3


def test_box_constrained_quadratic_active_set_hypergradient(registered):
    r"""g(x, y) = 0.5 y'Hy - (Bx)'y on the box [-1, 1]^n: dy_F/dx = H_FF^{-1} B_F, active rows zero."""
    gen = torch.Generator().manual_seed(3)
    n, m = 6, 3
    A = torch.randn(n, n, generator=gen, dtype=DT)
    H = A @ A.T + n * torch.eye(n, dtype=DT)
    B = torch.randn(n, m, generator=gen, dtype=DT)
    x0 = 3.0 * torch.randn(m, generator=gen, dtype=DT)
    c = torch.randn(n, generator=gen, dtype=DT)  # f(y) = c'y
    box = bl.Box(-1.0, 1.0)

    # the constrained minimizer by projected gradient (converged), its free set and the closed form
    y = torch.zeros(n, dtype=DT)
    step = 1.0 / float(torch.linalg.eigvalsh(H)[-1])
    for _ in range(20000):
        y = box.project(y - step * (H @ y - B @ x0))
    free = box.free_mask(y, 1e-9)
    assert 0 < int(free.sum()) < n
    Fi = free.nonzero().squeeze(1)
    dy = torch.zeros(n, m, dtype=DT)
    dy[Fi] = torch.linalg.solve(H[Fi][:, Fi], B[Fi])
    true = dy.T @ c

    name = registered(bl.Implicit(linear_solver=bl.CG(maxiter=50), mask_tol=1e-9))

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return c @ self.lower.module.value

    class Lower(adapter.ConstrainedProblem, ImplicitProblem):
        constraint = box

        def training_step(self, batch):
            v = self.module.value
            return 0.5 * v @ H @ v - (B @ self.upper.module.value) @ v

    upper = Upper("upper", Config(type="darts", retain_graph=True), module=_Holder(x0))
    lower = Lower("lower", Config(type=name), module=_Holder(y))
    upper.lower, lower.upper, lower.cur_batch = lower, upper, None
    got = get_grads(upper.training_step(None), [upper, lower, upper], retain_graph=False, do_sync=False)[0]
    torch.testing.assert_close(got, true, rtol=1e-8, atol=1e-10)


def test_register_rejects_betty_names_and_unsupported_strategies():
    with pytest.raises(ValueError, match="one of Betty's own"):
        adapter.register("cg", bl.Implicit())
    with pytest.raises(TypeError, match="supports Implicit, Linearized and FirstOrder"):
        adapter.register("bilevel_unrolled", bl.Unrolled())
    with pytest.raises(KeyError):
        adapter.unregister("neumann")


def test_linearized_without_linearization_point_raises(registered):
    name = registered(bl.Linearized(step=0.1))
    with pytest.raises(ValueError, match="linearization point"):
        _ridge_betty_hypergrad(name)


def test_adapter_imports_without_betty():
    code = (
        "import sys; sys.modules['betty'] = None; sys.modules['betty.hypergradient'] = None\n"
        "import bilevel as bl\n"
        "from bilevel.integrations import betty as a\n"
        "assert not a.betty_available()\n"
        "try:\n"
        "    a.register('x', bl.Implicit())\n"
        "except ImportError as e:\n"
        "    assert 'betty-ml==0.2.1' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
