r"""bilevel._autodiff: gradients and exact second-order products against closed forms.

Objective :math:`g(x, y) = \sum_i e^{x_i a_i} + \tfrac12 \|b\|^2 \cdot s` on a tree
``y = {"a": a, "b": b}`` with a scalar upper leaf ``s`` alongside ``x``:
:math:`\nabla_a g = x \odot e^{x \odot a}`, :math:`\nabla^2_{aa} g = \mathrm{diag}(x^2 e^{x a})`,
:math:`\partial_x \langle \nabla_a g, u\rangle = (1 + x a)\, e^{x a} \odot u`,
:math:`\nabla^2_{bb} g = s I`, :math:`\partial_s \langle \nabla_b g, u_b\rangle = \langle b, u_b\rangle`.
"""

from __future__ import annotations

import pytest
import torch

from bilevel._autodiff import ExactProducts, reaches, value_and_grad_y
from bilevel._tree import leaves

D = torch.float64


def g(x, y):
    return torch.exp(x["w"] * y["a"]).sum() + 0.5 * x["s"] * (y["b"] ** 2).sum()


@pytest.fixture
def point():
    gen = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(5, generator=gen, dtype=D), "s": torch.tensor(1.7, dtype=D)}
    y = {"a": torch.randn(5, generator=gen, dtype=D), "b": torch.randn(3, generator=gen, dtype=D)}
    return x, y


def closed_forms(x, y, u):
    w, s, a, b = x["w"], x["s"], y["a"], y["b"]
    ua, ub = u[:5], u[5:]
    e = torch.exp(w * a)
    hvp = torch.cat([w * w * e * ua, s * ub])
    cross = {"w": (1 + w * a) * e * ua, "s": b @ ub}
    grad = {"a": w * e, "b": s * b}
    return grad, hvp, cross


def test_value_and_grad_y(point):
    x, y = point
    value, grad = value_and_grad_y(g, x, y, create_graph=False)
    expected, _, _ = closed_forms(x, y, torch.zeros(8, dtype=D))
    torch.testing.assert_close(value, g(x, y), rtol=1e-15, atol=0)
    for k in ("a", "b"):
        torch.testing.assert_close(grad[k], expected[k], rtol=1e-14, atol=0)
        assert not grad[k].requires_grad


def test_exact_products_match_the_closed_forms(point):
    x, y = point
    x_flat, x_spec = leaves(x)
    y_flat, y_spec = leaves(y)
    prod = ExactProducts(g, x_flat, x_spec, y_flat, y_spec)
    U = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=D)
    for u in U:
        _, hvp, cross = closed_forms(x, y, u)
        torch.testing.assert_close(prod.hvp(u), hvp, rtol=1e-13, atol=1e-15)
        got = dict(zip(x_spec.context, prod.cross(u)))
        for k in ("w", "s"):
            torch.testing.assert_close(got[k], cross[k], rtol=1e-13, atol=1e-15)
    rows = prod.hvp_batched(U)
    torch.testing.assert_close(rows, torch.stack([closed_forms(x, y, u)[1] for u in U]), rtol=1e-13, atol=1e-15)


def test_a_lower_leaf_that_g_ignores_gets_zero_products():
    def g2(x, y):
        return (x * y[0] ** 2).sum() + 0.0 * y[1].sum()  # y[1] enters linearly: its gradient has no graph

    x = torch.tensor([1.0, 2.0])
    y = (torch.tensor([0.5, -1.0]), torch.tensor([3.0, 4.0, 5.0]))
    x_flat, x_spec = leaves(x)
    y_flat, y_spec = leaves(y)
    prod = ExactProducts(g2, x_flat, x_spec, y_flat, y_spec)
    u = torch.tensor([1.0, -2.0, 7.0, 7.0, 7.0])
    torch.testing.assert_close(prod.hvp(u), torch.tensor([2.0, -8.0, 0.0, 0.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(prod.cross(u)[0], torch.tensor([2 * 0.5 * 1.0, 2 * -1.0 * -2.0]), rtol=0, atol=0)


def test_products_under_vmap_use_torch_func(point):
    """Batched over x with torch.func.vmap, the products come from torch.func and match the closed forms per row."""
    _, y = point
    X = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=D)
    u = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=D)
    s = torch.tensor(0.8, dtype=D)

    def hvp_at(w):
        x = {"w": w, "s": s}
        x_flat, x_spec = leaves(x)
        y_flat, y_spec = leaves(y)
        prod = ExactProducts(g, x_flat, x_spec, y_flat, y_spec)
        assert prod.functorch
        return prod.hvp(u)

    rows = torch.func.vmap(hvp_at)(X)
    for w, row in zip(X, rows):
        torch.testing.assert_close(row, closed_forms({"w": w, "s": s}, y, u)[1], rtol=1e-13, atol=1e-15)


def test_non_scalar_objective_is_one_clear_error(point):
    x, y = point
    with pytest.raises(ValueError, match=r"must return a scalar tensor, got \(5,\)"):
        ExactProducts(lambda x, y: x["w"] * y["a"], *leaves(x), *leaves(y))


def test_reaches_walks_the_graph_to_leaves_and_non_leaves():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    mid = a * 2  # a non-leaf input
    out = (mid.sin() * b.detach()).sum()
    assert reaches([out], [a]) and reaches([out], [mid]) and not reaches([out], [b])
    assert not reaches([torch.randn(2)], [a])  # no graph at all
    assert reaches([out, (b ** 2).sum()], [b])  # any output, any input
    assert not reaches([out], [torch.randn(3)])  # an input that does not require grad is never reached
    assert reaches([a], [a]) and not reaches([a], [b])  # a leaf output is its own node


def test_gradients_of_a_g_without_x_are_zeros():
    """grad_x g of a g that ignores x (the products by differences ask for it alone): zeros, not torch's
    'does not require grad' error; the implicit hypergradient by differences is then zero as well."""
    import bilevel as bl
    from bilevel._autodiff import gradients

    x, y = torch.randn(3, dtype=D), torch.randn(4, dtype=D)
    gx, gy = gradients(lambda x, y: (y ** 2).sum(), [x], leaves(x)[1], [y], leaves(y)[1], wrt_x=True, wrt_y=False)
    assert gy is None and torch.equal(gx[0], torch.zeros(3, dtype=D))
    c = torch.randn(4, dtype=D)
    lower = bl.LowerProblem(lambda x, y: 0.5 * ((y - c) ** 2).sum(), solver=bl.GradientDescent(0.5, 60))
    for products in (bl.CentralDifference(), bl.ForwardDifference()):
        _, grad = bl.value_and_hypergrad(lambda x, y: (y ** 2).sum(), lower, x, torch.zeros(4, dtype=D),
                                         bl.Implicit(products=products, check=None))
        assert torch.equal(grad, torch.zeros(3, dtype=D))

