r"""Box-type constraint sets: projection, free mask, intersections, per-sample bounds, validation."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def test_box_projection_and_free_mask():
    box = bl.Box(-1.0, 2.0)
    y = torch.tensor([-3.0, -1.0, 0.5, 2.0, 5.0])
    assert torch.equal(box.project(y), torch.tensor([-1.0, -1.0, 0.5, 2.0, 2.0]))
    assert torch.equal(box.free_mask(y), torch.tensor([False, False, True, False, False]))
    # tol shrinks the free set
    assert torch.equal(box.free_mask(torch.tensor([-0.95, 0.0, 1.99]), tol=0.1), torch.tensor([False, True, False]))


def test_linf_ball_is_the_box_around_its_center():
    c = torch.tensor([0.0, 1.0, -2.0])
    ball = bl.LInfBall(c, 0.5)
    y = torch.tensor([1.0, 1.2, -3.0])
    assert torch.equal(ball.project(y), torch.tensor([0.5, 1.2, -2.5]))
    assert torch.equal(ball.free_mask(ball.project(y)), torch.tensor([False, True, False]))
    assert bl.LInfBall(0.0, 0.0).project(torch.tensor([3.0])).item() == 0.0


def test_adversarial_intersection_per_sample_bounds():
    """{||delta||_inf <= eps} ∩ {0 <= x + delta <= 1} with x of shape (B, n): bounds max(-eps, -x), min(eps, 1 - x)."""
    eps = 0.1
    x = torch.tensor([[0.05, 0.5, 0.97], [0.0, 1.0, 0.3]])
    C = bl.LInfBall(0.0, eps) & bl.Box(-x, 1 - x)
    assert isinstance(C, bl.Intersection) and len(C.parts) == 2
    assert torch.allclose(C.lower, torch.maximum(torch.full_like(x, -eps), -x))
    assert torch.allclose(C.upper, torch.minimum(torch.full_like(x, eps), 1 - x))
    delta = torch.randn(2, 3)
    p = C.project(delta)
    assert bool(((x + p) >= 0).all() and ((x + p) <= 1).all() and (p.abs() <= eps).all())
    # projection onto the intersection of boxes is the clamp to the combined bounds
    assert torch.equal(p, torch.clamp(delta, C.lower, C.upper))
    C.check_shape(delta)
    with pytest.raises(ValueError, match=r"does not broadcast to the variable's shape \(3,\)"):
        C.check_shape(torch.zeros(3))
    # a three-way intersection flattens its parts
    C3 = C & bl.Box(-0.05, 1.0)
    assert len(C3.parts) == 3 and torch.allclose(C3.lower, torch.maximum(C.lower, torch.tensor(-0.05)))


def test_intersection_of_floats_stays_float():
    C = bl.Box(-1.0, 1.0) & bl.LInfBall(0.5, 1.0)
    assert C.lower == -0.5 and C.upper == 1.0


def test_projection_is_differentiable_with_mask_jacobian():
    box = bl.Box(torch.tensor([-1.0, -1.0, -1.0]), 1.0)
    y = torch.tensor([-2.0, 0.3, 4.0], requires_grad=True)
    box.project(y).sum().backward()
    assert torch.equal(y.grad, torch.tensor([0.0, 1.0, 0.0]))


def test_box_validation():
    with pytest.raises(ValueError, match="lower > upper at 1 coordinate"):
        bl.Box(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="lower > upper"):
        bl.Box(1.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        bl.Box(torch.tensor([float("nan")]), 1.0)
    bl.Box(1.0, 0.0, check=False)  # no check requested: no error
    with pytest.raises(ValueError, match="radius must be >= 0"):
        bl.LInfBall(0.0, -0.1)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        bl.LInfBall(0.0, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="empty"):
        bl.LInfBall(0.0, 0.1) & bl.Box(0.5, 1.0)
    with pytest.raises(TypeError, match="only box-like sets"):
        bl.Intersection(bl.Box(0.0, 1.0), object())
    with pytest.raises(ValueError, match="at least one set"):
        bl.Intersection()


def test_per_sample_bounds_built_under_vmap_skip_the_check_and_match_a_loop():
    """Box(-img, 1 - img) inside a vmapped per-sample function: the check cannot read batched values, so it is
    skipped (a loop still checks), and the Linearized gradient equals the loop's; under grad alone it still checks."""
    torch.manual_seed(0)
    imgs, W = torch.rand(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)

    def per_sample(W, img):
        g = lambda W, delta: -torch.nn.functional.softplus((img + delta) @ W)
        lower = bl.LowerProblem(g, constraint=bl.LInfBall(0.0, 0.1) & bl.Box(-img, 1 - img),
                                solver=bl.ProjectedGradient(0.05, 10))
        delta = bl.solve(lower, W, torch.zeros_like(img), bl.Linearized(step=0.05))
        return torch.nn.functional.softplus((img + delta) @ W)

    loop = torch.stack([torch.func.grad(per_sample)(W, img) for img in imgs])
    batched = torch.func.vmap(torch.func.grad(per_sample), in_dims=(None, 0))(W, imgs)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="lower > upper"):
        torch.func.grad(lambda w: bl.Box(w + 1.0, w).project(w).sum())(W)
    with pytest.raises(ValueError, match="radius must be >= 0"):  # a batched center leaves a float radius readable
        torch.func.vmap(lambda img: bl.LInfBall(img, -0.1).project(img))(imgs)


def test_check_shape():
    bl.Box(torch.zeros(4), 1.0).check_shape(torch.zeros(2, 4))  # broadcasts: fine
    with pytest.raises(ValueError, match=r"lower bound of shape \(3,\) does not broadcast"):
        bl.Box(torch.zeros(3), 1.0).check_shape(torch.zeros(4))
    with pytest.raises(ValueError, match=r"upper bound of shape \(2, 4\)"):
        bl.Box(0.0, torch.ones(2, 4)).check_shape(torch.zeros(4))


def test_intersection_with_a_float_bound_keeps_tensor_bounds_exact():
    x = torch.rand(3, 4)
    c = bl.LInfBall(0.0, 0.1, check=False) & bl.Box(-x, 1 - x, check=False)
    torch.testing.assert_close(c.lower, torch.maximum(torch.full_like(x, -0.1), -x), rtol=0, atol=0)
    torch.testing.assert_close(c.upper, torch.minimum(torch.full_like(x, 0.1), 1 - x), rtol=0, atol=0)
