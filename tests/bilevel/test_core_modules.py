r"""``nn.Module`` variables (:mod:`bilevel.modules`): a module with BatchNorm as the lower variable gives the
hypergradient of the parameter-dict formulation (float64), and no strategy touches its running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bilevel as bl

STRATEGIES = {
    "implicit": lambda: bl.Implicit(bl.CG(maxiter=40), check=None),
    "unrolled": lambda: bl.Unrolled(),
    "linearized-central": lambda: bl.Linearized(step=0.1, products=bl.CentralDifference()),
    "first-order-init": lambda: bl.FirstOrder(through_init=True),
}


def _net():
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        net[1].bias.normal_()  # away from the zero start, so that every strategy's derivative is non-zero
        net[1].running_mean.normal_()
    return net


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_module_lower_variable_equals_the_parameter_dict_formulation(name):
    X, Y = torch.randn(32, 3), torch.randn(32, 1)
    net = _net()
    net.train()
    before = copy.deepcopy(net.state_dict())
    reg = torch.randn(8, requires_grad=True)  # the upper variable: a weight on the hidden units' bias
    model = bl.functional(net)

    def g(r, w):
        return ((model(w, X) - Y) ** 2).mean() + 0.5 * (torch.exp(r) * w["1.bias"] ** 2).sum() + 0.05 * sum(
            (v ** 2).sum() for v in w.values())

    f = lambda r, w: ((model(w, X[:16]) - Y[:16]) ** 2).mean()
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.05, 30))
    strategy = STRATEGIES[name]()
    f(reg, bl.solve(lower, reg, net, strategy)).backward()  # init: the module itself
    got = reg.grad.clone()
    # the same problem on a {name: tensor} dict and a copy of the net without running statistics
    twin = copy.deepcopy(net)
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    call = lambda w, x: torch.func.functional_call(twin, w, (x,))
    g2 = lambda r, w: ((call(w, X) - Y) ** 2).mean() + 0.5 * (torch.exp(r) * w["1.bias"] ** 2).sum() + 0.05 * sum(
        (v ** 2).sum() for v in w.values())
    f2 = lambda r, w: ((call(w, X[:16]) - Y[:16]) ** 2).mean()
    r2 = reg.detach().clone().requires_grad_()
    init = {k: v.detach().clone() for k, v in twin.named_parameters()}
    f2(r2, bl.solve(bl.LowerProblem(g2, solver=bl.GradientDescent(0.05, 30)), r2, init, STRATEGIES[name]())).backward()
    if name != "first-order-init":
        assert got.abs().max() > 1e-6
    torch.testing.assert_close(got, r2.grad, rtol=1e-12, atol=1e-14)
    for k, v in net.state_dict().items():  # running statistics and parameters untouched (a replay: bit equality)
        assert torch.equal(v, before[k]), k


def test_a_module_upper_variable_receives_the_gradient_in_its_parameters():
    """x = a module: backward() fills module.<param>.grad; load_parameters writes the solution back."""
    hyper = nn.Linear(2, 3).double()
    z = torch.randn(2)
    g = lambda h, w: 0.5 * ((w - bl.functional(hyper)(h, z)) ** 2).sum() + 0.1 * (w ** 4).sum()
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.3, 200))
    w = bl.solve(lower, hyper, torch.zeros(3), bl.Implicit(bl.DenseSolve()))
    w.sum().backward()
    assert hyper.weight.grad is not None and hyper.weight.grad.abs().sum() > 0
    # against the same solve with an explicit parameter dict
    params = {k: v.detach().clone().requires_grad_() for k, v in hyper.named_parameters()}
    bl.solve(lower, params, torch.zeros(3), bl.Implicit(bl.DenseSolve())).sum().backward()
    torch.testing.assert_close(hyper.weight.grad, params["weight"].grad, rtol=1e-12, atol=1e-14)
    net = nn.Linear(2, 3).double()
    bl.load_parameters(net, {"bias": w.detach()})
    assert torch.equal(net.bias, w.detach())


@pytest.mark.parametrize("strategy", [bl.Unrolled(), bl.FirstOrder(through_init=True),
                                      bl.Implicit(bl.CG(maxiter=40), check=None)], ids=repr)
def test_the_module_passed_as_x_and_init_is_one_variable(strategy):
    """MAML written with the module, ``solve(lower, net, net, ...)``, equals the tree passed twice: the start is x
    (through it, Unrolled and FirstOrder(through_init=True) get a non-zero meta-gradient from a g without x)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    xs, xq = torch.randn(10, 1, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    ys, yq = torch.sin(3 * xs), torch.sin(3 * xq)
    model = bl.functional(net)
    imaml = isinstance(strategy, bl.Implicit)  # iMAML's proximal term, solved to convergence; plain MAML otherwise
    g = lambda theta, w: ((model(w, xs) - ys) ** 2).mean() + imaml * 0.5 * sum(((w[k] - theta[k]) ** 2).sum() for k in w)
    lower = bl.LowerProblem(g, solver=bl.GradientDescent(0.1, 300 if imaml else 5))
    ((model(bl.solve(lower, net, net, strategy), xq) - yq) ** 2).mean().backward()
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    ((model(bl.solve(lower, theta, theta, strategy), xq) - yq) ** 2).mean().backward()
    for k, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 1e-6, k
        torch.testing.assert_close(p.grad, theta[k].grad, rtol=1e-12, atol=1e-14)


def test_bad_module_inputs_are_named():
    net = nn.Linear(2, 3)
    with pytest.raises(KeyError, match="no parameters"):
        bl.load_parameters(net, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        bl.load_parameters(net, {"bias": torch.zeros(4)})
    with pytest.raises(TypeError, match="dict"):
        bl.functional(net)(torch.zeros(3), torch.zeros(2))
    with pytest.raises(TypeError, match="nn.Module"):
        bl.parameters({"a": torch.zeros(1)})
