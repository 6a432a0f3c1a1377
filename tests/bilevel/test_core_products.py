r"""Second-order products by differences of first-order gradients (bilevel.products, bilevel.differences).

Oracles: the exact double-backward products (themselves checked against closed forms in
test_core_closed_forms.py and test_core_linearized.py), the closed-form Jacobian of the logistic
linearized model, and the error model of the step rule (central O(h^2), forward O(h), rounding
O(eps/h); relative errors near eps^(2/3) and eps^(1/2) at the rule's step).
"""

from __future__ import annotations

import math

import pytest
import torch
from _logistic import D_IN, B, attack_problem, logistic_data, oracle  # noqa: E402

import bilevel as bl
from bilevel._autodiff import ExactProducts
from bilevel._tree import leaves
from bilevel.differences import DifferenceProducts, machine_epsilon, rule_step


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cat(leaves):
    return torch.cat([t.reshape(-1) for t in leaves])


def _logistic_point(dtype=torch.float64):
    """The logistic attack objective at (theta, z) and a direction u shaped like z (the same draw each call)."""
    torch.manual_seed(0)
    theta, xs, ys, z = logistic_data()
    u = torch.randn(B, D_IN)
    lower = attack_problem(xs.to(dtype), ys.to(dtype))
    return lower.objective, theta.to(dtype), z.to(dtype), u.to(dtype)


def _products(objective, x, y, products):
    (x_flat, x_spec), (y_flat, y_spec) = leaves(x), leaves(y)
    return products.at(objective, x_flat, x_spec, y_flat, y_spec)


def _mixed_error(products, dtype):
    """Relative error of the mixed product of the logistic objective against the float64 exact one."""
    objective, theta, z, u = _logistic_point(torch.float64)
    exact = _cat(_products(objective, theta, z, bl.Exact()).cross(u.reshape(-1)))
    objective, theta, z, u = _logistic_point(dtype)
    return rel(_cat(_products(objective, theta, z, products).cross(u.reshape(-1))), exact)


# ---------------------------------------------------------------------------------------------
# Accuracy of the strategies' hypergradients (ridge and quadratic: test_core_closed_forms.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("products", [bl.CentralDifference(), bl.ForwardDifference()], ids=["central", "forward"])
@pytest.mark.parametrize("step,lam", [(0.5, None), (0.5, 10.0)], ids=["lam=1/step", "lam=10"])
def test_linearized_logistic_jacobian_matches_closed_form(products, step, lam):
    theta, xs, ys, z = logistic_data()
    lower = attack_problem(xs, ys)
    inv_lam = step if lam is None else 1.0 / lam
    delta_o, J_o, free = oracle(theta, xs, ys, z, step, inv_lam)
    assert free.any() and (~free).any()
    strategy = bl.Linearized(step=step, lam=lam, products=products)
    delta = bl.solve(lower, theta, z, strategy)
    # same value; the gradient comes from a first-order pass here and from a double-backward-ready graph there
    torch.testing.assert_close(delta, bl.solve(lower, theta, z, bl.Linearized(step=step, lam=lam)), rtol=1e-15, atol=1e-16)
    J = torch.autograd.functional.jacobian(lambda th: bl.solve(lower, th, z, strategy), theta)
    assert rel(J, J_o) < 1e-6


def test_implicit_mlp_hypergradient_matches_exact(mlp_problem):
    P = mlp_problem
    lower = P.lower(150)
    w = bl.solve(lower, P.x0, P.init, bl.FirstOrder())
    solved = bl.LowerProblem(P.g, solver=bl.ClosedForm(lambda x: w))
    _, ref = bl.value_and_hypergrad(P.f, solved, P.x0, P.init, bl.Implicit(bl.CG(maxiter=40)))
    errors = {}
    for name, products in [("central", bl.CentralDifference()), ("forward", bl.ForwardDifference())]:
        _, got = bl.value_and_hypergrad(P.f, solved, P.x0, P.init, bl.Implicit(bl.CG(maxiter=40), products=products))
        errors[name] = rel(got, ref)
    assert errors["central"] < 1e-9 and errors["forward"] < 1e-6, errors


# ---------------------------------------------------------------------------------------------
# The error model: central O(h^2), forward O(h), rounding O(eps / h), the rule near the optimum
# ---------------------------------------------------------------------------------------------

def test_central_beats_forward_by_the_predicted_ratio():
    """At the rule's step the relative errors are about eps^(2/3) (central) and eps^(1/2) (forward):
    their ratio is about eps^(-1/6), 400 in float64 and 14 in float32."""
    for dtype, min_ratio in [(torch.float64, 50.0), (torch.float32, 5.0)]:
        central = _mixed_error(bl.CentralDifference(), dtype)
        forward = _mixed_error(bl.ForwardDifference(), dtype)
        assert forward / central > min_ratio, (dtype, central, forward)


def test_truncation_error_is_second_order_for_central_and_first_order_for_forward():
    """Where truncation dominates (large h, float64), 10x the step gives 100x (central) and 10x (forward) the error."""
    for cls, order in [(bl.CentralDifference, 2.0), (bl.ForwardDifference, 1.0)]:
        e1, e2 = (_mixed_error(cls(h=h), torch.float64) for h in (1e-3, 1e-2))
        assert math.log10(e2 / e1) == pytest.approx(order, abs=0.15), (cls.__name__, e1, e2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cls", [bl.CentralDifference, bl.ForwardDifference], ids=["central", "forward"])
def test_rule_step_is_near_the_best_step_of_a_sweep(cls, dtype):
    """Sweep h over 10 decades: the rule's error is within 10x of the sweep's best (the V-shaped curve is
    flat near its bottom) and its step within a factor 30 of the best step."""
    hs = [10.0 ** (k / 4) for k in range(-44, 1)]
    errors = [_mixed_error(cls(h=h), dtype) for h in hs]
    best = min(range(len(hs)), key=errors.__getitem__)
    rule_error = _mixed_error(cls(), dtype)
    objective, theta, z, u = _logistic_point(dtype)
    rule_h = float(rule_step([z], cls is bl.CentralDifference) / u.norm())
    assert rule_error < 10 * errors[best], (rule_error, errors[best], hs[best])
    assert 1 / 30 < rule_h / hs[best] < 30, (rule_h, hs[best])
    # the sweep's ends are far worse: rounding on the left, truncation on the right
    assert errors[0] > 100 * errors[best] and errors[-1] > 100 * errors[best]


def test_float32_errors_are_bounded_as_stated():
    """float32 at the rule's step (docstrings: about 2e-5 central, 3e-4 forward, times the conditioning)."""
    assert _mixed_error(bl.CentralDifference(), torch.float32) < 1e-4
    assert _mixed_error(bl.ForwardDifference(), torch.float32) < 3e-3


def test_hvp_matches_exact_on_a_nonquadratic_objective(mlp_problem):
    P = mlp_problem
    (x_flat, x_spec), (y_flat, y_spec) = leaves(P.x0), leaves(P.init)
    exact = ExactProducts(P.g, x_flat, x_spec, y_flat, y_spec)
    V = torch.randn(3, sum(t.numel() for t in y_flat))
    for central, tol in [(True, 1e-9), (False, 1e-6)]:
        fd = DifferenceProducts(P.g, x_flat, x_spec, y_flat, y_spec, central=central)
        assert rel(fd.hvp(V[0]), exact.hvp(V[0])) < tol
        assert rel(fd.hvp_batched(V), exact.hvp_batched(V)) < tol
        assert rel(_cat(fd.cross(V[1])), _cat(exact.cross(V[1]))) < tol


def test_zero_direction_gives_zero_and_step_is_a_tensor():
    objective, theta, z, _ = _logistic_point()
    for products in [bl.CentralDifference(), bl.ForwardDifference()]:
        fd = _products(objective, theta, z, products)
        out = _cat(fd.cross(torch.zeros(z.numel())))
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(fd.hvp(torch.zeros(z.numel())), torch.zeros(z.numel()))
    step = rule_step([z], True)
    assert isinstance(step, torch.Tensor) and step.ndim == 0 and not step.requires_grad
    assert float(step) == pytest.approx((3 * torch.finfo(torch.float64).eps) ** (1 / 3) * (1 + float(z.norm())))


def test_machine_epsilon_follows_autocast():
    t = torch.zeros(3, dtype=torch.float32)
    assert machine_epsilon(t) == torch.finfo(torch.float32).eps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert machine_epsilon(t) == torch.finfo(torch.bfloat16).eps
    assert machine_epsilon(t.double()) == torch.finfo(torch.float64).eps


# ---------------------------------------------------------------------------------------------
# Cost: which gradients are evaluated (the forward difference reuses the gradient at the point)
# ---------------------------------------------------------------------------------------------

def _counting(objective):
    calls = []

    def counted(x, y):
        calls.append(1)
        return objective(x, y)

    return counted, calls


@pytest.mark.parametrize("products,forward_calls,backward_calls", [
    (bl.Exact(), 1, 0), (bl.CentralDifference(), 1, 2), (bl.ForwardDifference(), 1, 1)],
    ids=["exact", "central", "forward"])
def test_linearized_evaluations_of_g(products, forward_calls, backward_calls):
    theta, xs, ys, z = logistic_data()
    lower = attack_problem(xs, ys)
    counted, calls = _counting(lower.objective)
    lower = bl.LowerProblem(counted, constraint=lower.constraint)
    th = theta.clone().requires_grad_()
    delta = bl.solve(lower, th, z, bl.Linearized(step=0.5, lam=10.0, products=products))
    assert len(calls) == forward_calls
    delta.sum().backward()
    assert len(calls) == forward_calls + backward_calls
    assert th.grad.abs().sum() > 0


def test_implicit_forward_difference_computes_the_base_gradient_once(mlp_problem):
    P = mlp_problem
    w = bl.solve(P.lower(150), P.x0, P.init, bl.FirstOrder())
    counted, calls = _counting(P.g)
    lower = bl.LowerProblem(counted, solver=bl.ClosedForm(lambda x: w))
    x = P.x0.clone().requires_grad_()
    y = bl.solve(lower, x, P.init, bl.Implicit(bl.CG(maxiter=7), products=bl.ForwardDifference()))
    calls.clear()
    P.f(x, y).backward()
    assert len(calls) == 7 + 1 + 1  # one per CG product, one for the mixed product, one at the point


# ---------------------------------------------------------------------------------------------
# torch.func composition
# ---------------------------------------------------------------------------------------------

STRATEGIES = {
    "implicit-central": lambda: bl.Implicit(bl.CG(maxiter=40), products=bl.CentralDifference()),
    "implicit-forward": lambda: bl.Implicit(bl.CG(maxiter=40), products=bl.ForwardDifference()),
    "linearized-central": lambda: bl.Linearized(step=0.5, lam=4.0, products=bl.CentralDifference()),
    "linearized-forward": lambda: bl.Linearized(step=0.5, products=bl.ForwardDifference()),
}


def _exact_twin(strategy):
    return type(strategy)(**{**{k: getattr(strategy, k) for k in strategy.__dataclass_fields__
                                if strategy.__dataclass_fields__[k].init}, "products": bl.Exact()})


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_func_grad_vmap_and_jacrev(mlp_problem, name):
    P = mlp_problem
    lower = P.lower(150)
    strategy = STRATEGIES[name]()
    exact = _exact_twin(strategy)
    tol = 1e-8 if "central" in name else 1e-5

    def F(s):
        return lambda x: P.f(x, bl.solve(lower, x, P.init, s))

    x = P.x0.clone().requires_grad_()
    F(strategy)(x).backward()
    got = torch.func.grad(F(strategy))(P.x0)
    assert rel(got, x.grad) < 1e-12  # torch.func and autograd run the same differences
    assert rel(got, torch.func.grad(F(exact))(P.x0)) < tol
    xs = P.x0 + 0.3 * torch.randn(3, 3)
    assert rel(torch.func.vmap(torch.func.grad(F(strategy)))(xs), torch.func.vmap(torch.func.grad(F(exact)))(xs)) < tol
    # second derivatives: the derivative of the difference quotient (h is a constant)
    hess = torch.func.jacrev(torch.func.grad(F(strategy)))(P.x0)
    assert rel(hess, torch.func.jacrev(torch.func.grad(F(exact)))(P.x0)) < 100 * tol


def test_plain_double_backward_through_a_difference_raises():
    theta, xs, ys, z = logistic_data()
    lower = attack_problem(xs, ys)
    th = theta.clone().requires_grad_()
    delta = bl.solve(lower, th, z, bl.Linearized(step=0.5, products=bl.CentralDifference()))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(delta.sum(), th, create_graph=True)


# ---------------------------------------------------------------------------------------------
# Bad options
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", [lambda p: bl.Implicit(products=p), lambda p: bl.Linearized(0.5, products=p)],
                         ids=["implicit", "linearized"])
def test_bad_products_option_raises(strategy):
    with pytest.raises(TypeError, match="products must be bilevel.Exact"):
        strategy("central")
    with pytest.raises(TypeError, match="an instance: call it"):
        strategy(bl.CentralDifference)


@pytest.mark.parametrize("h", [0.0, -1e-3, math.nan, math.inf, True, "1e-3"])
@pytest.mark.parametrize("cls", [bl.CentralDifference, bl.ForwardDifference])
def test_bad_step_raises(cls, h):
    with pytest.raises(ValueError, match=f"{cls.__name__}: h must be None"):
        cls(h=h)


@pytest.mark.parametrize("cls", [bl.CentralDifference, bl.ForwardDifference])
def test_bad_scale_raises(cls):
    for scale in [0.0, -2.0, math.nan, False]:
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            cls(scale=scale)
    with pytest.raises(ValueError, match="give one of"):
        cls(h=1e-3, scale=10.0)


def test_scale_multiplies_the_rule_step():
    objective, theta, z, u = _logistic_point()
    for cls in [bl.CentralDifference, bl.ForwardDifference]:
        d1, f1 = _products(objective, theta, z, cls()).step(u.reshape(-1))
        d10, f10 = _products(objective, theta, z, cls(scale=10.0)).step(u.reshape(-1))
        assert torch.allclose(d10, 10 * d1, rtol=1e-14) and torch.allclose(f10, f1 / 10, rtol=1e-14)


def test_exact_is_the_default():
    assert bl.Implicit().products == bl.Exact() and bl.Linearized(0.5).products == bl.Exact()


def test_linearized_backward_uses_the_forward_autocast_state():
    """Forward under bf16 autocast, backward outside it: the differences are taken under bf16, as the
    forward pass's gradient was (a forward difference of a bf16 and a float32 gradient would be noise)."""
    theta, xs, ys, z = (t.float() for t in logistic_data())
    lower = attack_problem(xs, ys)
    grads = []
    for backward_in_autocast in (False, True):
        th = theta.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            delta = bl.solve(lower, th, z, bl.Linearized(step=0.5, products=bl.ForwardDifference()))
            if backward_in_autocast:
                delta.sum().backward()
        if not backward_in_autocast:
            delta.sum().backward()
        grads.append(th.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_torch_compile_of_a_differenced_linearized_step():
    """AOTAutograd compiles no double backward; the differenced products need none (the Function runs eagerly
    behind a graph break), so the compiled step gives the eager step's gradient and Exact() raises."""
    theta, xs, ys, z = logistic_data()
    lower = attack_problem(xs, ys)

    def loss(th, products):
        delta = bl.solve(lower, th, z, bl.Linearized(step=0.5, products=products), check_finite=False)
        return torch.nn.functional.softplus(-ys * ((xs + delta) @ th)).sum()

    for products in [bl.CentralDifference(), bl.ForwardDifference()]:
        eager, compiled = theta.clone().requires_grad_(), theta.clone().requires_grad_()
        loss(eager, products).backward()
        torch.compile(lambda th, p=products: loss(th, p), backend="aot_eager")(compiled).backward()
        assert rel(compiled.grad, eager.grad) < 1e-12
    with pytest.raises(RuntimeError, match="double backward"):
        torch.compile(lambda th: loss(th, bl.Exact()), backend="aot_eager")(theta.clone().requires_grad_()).backward()
