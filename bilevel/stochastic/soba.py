r"""SOBA (Dagréou, Ablin, Vaiter & Moreau, NeurIPS 2022): one step on y, on v and on x per iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._tree import Tree, leaves, leaves_like, tree_map, unflatten
from .single_loop import SingleLoop, StepSize, partials, requires_grad
from .state import StochasticState

__all__ = ["SOBA"]


@dataclass(eq=False)
class SOBA(SingleLoop):
    r"""Stochastic Bilevel Algorithm: one loop over the lower iterate :math:`y`, the system variable :math:`v` and :math:`x`.

    With a lower batch :math:`B` and an independent upper batch :math:`B_f` per iteration (Dagréou et
    al., 2022, Algorithm 1), all at the current :math:`(x, y, v)`:

    .. math::

        D_y &= \nabla_y g(x, y, B), \\
        D_v &= \nabla^2_{yy} g(x, y, B)\, v + \nabla_y f(x, y, B_f), \\
        D_x &= \nabla^2_{xy} g(x, y, B)\, v + \nabla_x f(x, y, B_f),

    then :math:`y \leftarrow \mathrm{Proj}_C(y - \rho D_y)`, :math:`v \leftarrow v - \rho D_v`, and
    ``step`` returns :math:`D_x` for the user's optimizer on :math:`x` (step size :math:`\gamma`, its
    ``lr``). :math:`v` tracks :math:`-[\nabla^2_{yy} g]^{-1} \nabla_y f`; with a box constraint the
    :math:`v`-step uses the masked system :math:`D \nabla^2_{yy} g D + (I - D)` and right-hand side
    :math:`D \nabla_y f` (:math:`D` the free coordinates at :math:`y`), so :math:`v` vanishes on active ones.

    Bias and variance: given :math:`(y, v)`, the three directions are unbiased estimates of their full-batch
    values (the two batches are independent); the method converges with decreasing steps
    (:math:`\rho_t, \gamma_t \propto t^{-2/5}` in the paper's analysis; constant steps reach a noise floor).
    Cost per iteration: one forward of :math:`g` with a gradient and one double backward that gives
    :math:`\nabla^2_{yy} g\, v` and :math:`\nabla^2_{xy} g\, v` together, plus one forward and backward of
    :math:`f`.

    Args:
        lower, upper, step_size, lower_batches, upper_batches, mask_tol: see :class:`SingleLoop`;
            ``step_size`` is :math:`\rho`, used for :math:`y` and :math:`v`.
        v_step_size: a different step for :math:`v` (``None``: ``step_size``).
    """

    v_step_size: Optional[StepSize] = None

    def init(self, y0: Tree) -> StochasticState:
        state = super().init(y0)
        state.v = tree_map(torch.zeros_like, state.y)
        return state

    def step(self, x: Tree, state: StochasticState) -> Tree:
        t = state.step
        rho = self.rate(self.step_size, t)
        rho_v = rho if self.v_step_size is None else self.rate(self.v_step_size, t)
        x_flat, x_spec = leaves(x)
        y_flat, y_spec = leaves(state.y)
        v = leaves_like(state.v, y_spec, "linear-system variable v")
        xs, ys = requires_grad(x_flat), requires_grad(y_flat)
        gb, fb = self.draw()
        masks = self.free_mask(y_flat, y_spec)
        vm = v if masks is None else [m * a for m, a in zip(masks, v)]
        _, _, gy = partials(self.lower.objective, xs, x_spec, ys, y_spec, gb, create_graph=True, wrt_x=False)
        live = [i for i, a in enumerate(gy) if a.requires_grad]
        with torch.enable_grad():
            second = torch.autograd.grad([gy[i] for i in live], [*xs, *ys], [vm[i] for i in live], allow_unused=True)
        second = [torch.zeros_like(a) if s is None else s for s, a in zip(second, [*xs, *ys])]
        cross, hv = second[: len(xs)], second[len(xs):]
        _, fx, fy = partials(self.upper, xs, x_spec, ys, y_spec, fb)
        gy, cross, hv, fx, fy = self.average([d.detach() for d in gy], cross, hv, fx, fy)
        if masks is None:
            v = [a - rho_v * (h + b) for a, h, b in zip(v, hv, fy)]
        else:
            v = [a - rho_v * (m * (h + b) + (1 - m) * a) for a, h, b, m in zip(v, hv, fy, masks)]
        state.v = unflatten(v, y_spec)
        y_new = [a - rho * d.detach() for a, d in zip(y_flat, gy)]
        state.y = unflatten(self.project([a.detach() for a in y_new], y_spec), y_spec)
        state.step = t + 1
        return unflatten([a + c for a, c in zip(fx, cross)], x_spec)
