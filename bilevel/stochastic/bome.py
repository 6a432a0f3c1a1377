r"""BOME (Liu, Ye, Wright, Stone & Liu, NeurIPS 2022): bi-level optimization made easy, first order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._tree import Tree, leaves, unflatten
from .single_loop import SingleLoop, partials, requires_grad
from .state import StochasticState

__all__ = ["BOME"]


@dataclass(eq=False)
class BOME(SingleLoop):
    r"""A first-order method on the value-function constraint :math:`q(x, y) = g(x, y) - \min_\theta g(x, \theta) \le 0`.

    Per iteration, with a lower batch :math:`B` and an independent upper batch :math:`B_f` (Liu et al.,
    2022, Algorithm 1):

    1. :math:`\theta_T`: ``inner_steps`` :math:`T` projected gradient steps of size ``step_size`` on
       :math:`g(x, \cdot, B)` from :math:`y`, treated as a constant;
    2. :math:`\hat q(x, y) = g(x, y, B) - g(x, \theta_T, B)`, with gradient
       :math:`\nabla \hat q = (\nabla_x g(x, y, B) - \nabla_x g(x, \theta_T, B),\ \nabla_y g(x, y, B))`;
    3. the joint direction :math:`d = \nabla f + \lambda \nabla \hat q` with
       :math:`\lambda = \max\big((\phi - \langle \nabla f, \nabla \hat q\rangle) / \|\nabla \hat q\|^2, 0\big)`,
       :math:`\phi = \eta \|\nabla \hat q\|^2`: the smallest correction of :math:`\nabla f` that decreases
       :math:`\hat q` at rate :math:`\phi`;
    4. :math:`y \leftarrow \mathrm{Proj}_C(y - \xi d_y)`; ``step`` returns :math:`d_x` (use the same
       :math:`\xi` as the optimizer's ``lr`` for the paper's joint step).

    :math:`\lambda` is a device tensor (no host sync); norms and inner products run over all leaves of
    :math:`(x, y)`. The direction is not an unbiased hypergradient estimate (it is nonlinear in the
    batch); BOME converges to a stationary point of the value-function formulation, approximately the
    bi-level solution. Cost: :math:`T + 2` forwards and backwards of :math:`g` and one of :math:`f`, first order.

    Args:
        lower, upper, lower_batches, upper_batches, mask_tol: see :class:`SingleLoop`.
        step_size: the inner step :math:`\alpha` of :math:`\theta`.
        outer_step_size: :math:`\xi`, the step of :math:`y`.
        inner_steps: :math:`T`.
        eta: :math:`\eta` of :math:`\phi`.
    """

    outer_step_size: float = 0.1
    inner_steps: int = 10
    eta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"BOME: inner_steps must be an integer >= 1, got {self.inner_steps}")
        if not self.outer_step_size > 0 or not self.eta > 0:
            raise ValueError(f"BOME: outer_step_size and eta must be > 0, got {self.outer_step_size}, {self.eta}")

    def step(self, x: Tree, state: StochasticState) -> Tree:
        t = state.step
        alpha, xi = self.rate(self.step_size, t), self.rate(self.outer_step_size, t)
        x_flat, x_spec = leaves(x)
        y_flat, y_spec = leaves(state.y)
        xs, ys = requires_grad(x_flat), requires_grad(y_flat)
        gb, fb = self.draw()
        g = self.lower.objective
        x_const = [a.detach() for a in x_flat]
        theta = [a.detach() for a in y_flat]
        for _ in range(self.inner_steps):  # theta's leaves are fresh tensors without a graph: mark them in place
            _, _, d = partials(g, x_const, x_spec, [a.requires_grad_() for a in theta], y_spec, gb, wrt_x=False)
            (d,) = self.average(d)
            theta = self.project([(a - alpha * b).detach() for a, b in zip(theta, d)], y_spec)
        _, gx_theta, _ = partials(g, xs, x_spec, theta, y_spec, gb, wrt_y=False)
        _, gx, gy = partials(g, xs, x_spec, ys, y_spec, gb)
        _, fx, fy = partials(self.upper, xs, x_spec, ys, y_spec, fb)
        gx_theta, gx, gy, fx, fy = self.average(gx_theta, gx, gy, fx, fy)
        qx = [a - b for a, b in zip(gx, gx_theta)]
        nq = sum(torch.dot(a.reshape(-1), a.reshape(-1)) for a in [*qx, *gy])
        fq = sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip([*fx, *fy], [*qx, *gy]))
        lam = torch.clamp_min((self.eta * nq - fq) / nq.clamp_min(torch.finfo(nq.dtype).tiny), 0.0)
        state.y = unflatten(self.project([(a - xi * (b + lam * c)).detach() for a, b, c in zip(y_flat, fy, gy)], y_spec),
                            y_spec)
        state.step = t + 1
        return unflatten([a + lam * b for a, b in zip(fx, qx)], x_spec)
