"""Meta-Weight-Net's weighting: the lower objective, the detached loss, and the hypergradient of phi in float64."""

import pytest
import torch
from test_datacleaning_problem import tiny_problem

import bilevel as bl
from applications.datacleaning.problem import DataCleaning
from applications.datacleaning.weighting import SampleLogits, WeightNet

H = 4  # hidden width: 3 * 4 + 1 = 13 parameters


def mwn_problem():
    problem, theta0 = tiny_problem()
    net = WeightNet(H)
    phi = net.init(12, 0.3, seed=1, dtype=torch.float64, device=torch.device("cpu"))
    return DataCleaning(problem.data, problem.model, problem.weight_decay, net), theta0, phi


def gradient_descent(objective):
    # strongly convex (mu = 1, weights < 1): 80 steps of 0.6 converge to machine precision on this data
    return bl.LowerProblem(objective, solver=bl.GradientDescent(0.6, 80))


def test_lower_objective_weights_each_loss_by_the_network_of_its_detached_value():
    problem, theta0, phi = mwn_problem()
    theta = {k: torch.randn_like(v, generator=torch.Generator().manual_seed(3)).requires_grad_()
             for k, v in theta0.items()}
    p = problem.weighting.unflatten(phi.detach())
    losses = problem.train_losses(theta)
    v = torch.sigmoid(torch.relu(losses.detach()[:, None] * p["W1"][:, 0] + p["b1"]) @ p["W2"] + p["b2"])
    decay = sum(t.square().sum() for t in theta.values())
    value = problem.lower(phi, theta)
    assert float(value.detach()) == pytest.approx(float(((v * losses).mean() + 0.5 * decay).detach()), rel=1e-12)
    assert float(v.max() - v.min()) > 1e-3  # the weights do depend on the loss
    # the gradient in theta flows only through the loss factor: mean_i V_i grad l_i + mu theta
    grad = torch.autograd.grad(value, list(theta.values()))
    expected = torch.autograd.grad((v.detach() * losses).mean() + 0.5 * decay, list(theta.values()))
    for a, b in zip(grad, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_hypergradient_of_phi_matches_finite_differences_with_the_weights_frozen_at_the_solutions_losses():
    problem, theta0, phi = mwn_problem()
    lower = gradient_descent(problem.lower)
    theta = bl.solve(lower, phi, theta0, bl.Implicit(bl.DenseSolve()))
    _, residual = lower.value_and_grad(phi.detach(), theta)
    assert max(float(r.abs().max()) for r in residual.values()) < 1e-12
    problem.upper(phi, theta).backward()
    # the detached loss makes the weights data for theta: the exact hypergradient is the one of the problem
    # whose weights V_phi(l_i) are evaluated at the losses of the solution, held fixed
    losses = problem.train_losses({k: v.detach() for k, v in theta.items()}).detach()
    frozen = gradient_descent(problem.weighted_loss)

    def validation(p):
        weights = problem.weighting.weights(p, losses, None)
        return problem.upper(p, frozen.solver.run(frozen, weights, theta0))

    h = 1e-5
    fd = torch.empty_like(phi)
    for i in range(phi.numel()):
        e = torch.zeros_like(phi)
        e[i] = h
        fd[i] = (validation(phi.detach() + e) - validation(phi.detach() - e)) / (2 * h)
    assert float(fd.abs().max()) > 1e-3  # a nontrivial gradient
    torch.testing.assert_close(phi.grad, fd, rtol=1e-6, atol=1e-9)


def test_the_network_checks_its_parameter_count_and_width():
    with pytest.raises(ValueError, match="expected 13 parameters, got shape"):
        WeightNet(H).logits(torch.zeros(12), torch.zeros(5), None)
    with pytest.raises(ValueError, match="hidden must be >= 1, got 0"):
        WeightNet(0)
    assert SampleLogits().lr_scale(3000) == 3000.0 and WeightNet(H).lr_scale(3000) == 1.0
