r"""F2SA (Kwon, Kwon, Wright & Nowak, ICML 2023): a fully first-order penalty method."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from .._tree import Tree, leaves, leaves_like, unflatten
from .single_loop import SingleLoop, StepSize, partials, requires_grad
from .state import StochasticState

__all__ = ["F2SA", "benchopt_lam_growth"]


def benchopt_lam_growth(t: int) -> float:
    r"""benchopt's penalty schedule: :math:`\lambda_{t+1} = \lambda_t + 0.01 / (t + 1)^{1/7}`."""
    return 0.01 / (t + 1) ** (1 / 7)


@dataclass(eq=False)
class F2SA(SingleLoop):
    r"""Fully First-order Stochastic Approximation: the value-function penalty, no second derivative.

    :math:`x` minimizes the penalty :math:`\mathcal L_\lambda(x) = \min_y [f(x, y) + \lambda g(x, y)] - \lambda \min_z g(x, z)`,
    whose gradient is :math:`\nabla_x f(x, y_\lambda) + \lambda(\nabla_x g(x, y_\lambda) - \nabla_x g(x, z^\star))`
    and whose minimizer tends to the bi-level solution as :math:`\lambda \to \infty` (bias
    :math:`O(1/\lambda)`). Per iteration, with a lower batch :math:`B` and an independent upper batch
    :math:`B_f` (Kwon et al., 2023, Algorithm 1, one inner step):

    .. math::

        z &\leftarrow \mathrm{Proj}_C\big(z - \rho \nabla_y g(x, z, B)\big), \\
        y &\leftarrow \mathrm{Proj}_C\big(y - \tfrac{\rho}{\lambda} [\nabla_y f(x, y, B_f) + \lambda \nabla_y g(x, y, B)]\big), \\
        D_x &= \nabla_x f(x, y, B_f) + \lambda\big(\nabla_x g(x, y, B) - \nabla_x g(x, z, B)\big),

    all at the current iterates; ``step`` returns :math:`D_x` and then grows
    :math:`\lambda \leftarrow \lambda + \delta_t` (``lam_growth``), or sets :math:`\lambda_{t+1}` from
    ``lam_schedule``. By default the :math:`y`-step is :math:`\rho` on :math:`g + f/\lambda`, stable whatever
    :math:`\lambda`; ``scale_y_step=False`` takes the unscaled step :math:`y \leftarrow y - \rho_y [\nabla_y f +
    \lambda\nabla_y g]` instead, and ``y_step_size`` / ``z_step_size`` give the two iterates their own steps
    (benchopt's configuration of F2SA uses all three). The two :math:`\nabla_x g` use the same batch, so
    their difference has small variance when :math:`y \approx z`. Given the iterates, :math:`D_x` is unbiased
    for the full-batch penalty gradient. Cost: three forwards and three backwards, first order only.

    Args:
        lower, upper, step_size, lower_batches, upper_batches, mask_tol: see :class:`SingleLoop`.
        lam: the initial penalty :math:`\lambda_0`.
        lam_growth: :math:`\delta_t` as a function of the step count ``t`` (default:
            :func:`benchopt_lam_growth`, :math:`0.01 / (t+1)^{1/7}`); ``None`` keeps :math:`\lambda` fixed.
        lam_schedule: :math:`t \mapsto \lambda_t` (a finite number > 0), used from step 0 instead of ``lam``
            and ``lam_growth``.
        y_step_size, z_step_size: the steps :math:`\rho_y`, :math:`\rho_z` of the two iterates (numbers or
            schedules; ``None``: ``step_size``).
        scale_y_step: divide the :math:`y`-step by :math:`\lambda` (the default, above) or not.
    """

    lam: float = 1.0
    lam_growth: Optional[Callable[[int], float]] = benchopt_lam_growth
    lam_schedule: Optional[Callable[[int], float]] = None
    y_step_size: Optional[StepSize] = None
    z_step_size: Optional[StepSize] = None
    scale_y_step: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lam > 0:
            raise ValueError(f"F2SA: lam must be > 0, got {self.lam}")

    def init(self, y0: Tree) -> StochasticState:
        state = super().init(y0)
        state.z = state.y
        state.lam = float(self.lam) if self.lam_schedule is None else self._scheduled_lam(0)
        return state

    def _scheduled_lam(self, t: int) -> float:
        value = self.lam_schedule(t)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"F2SA: lam_schedule returned {value!r} at step {t}; expected a finite number > 0")
        return float(value)

    def step(self, x: Tree, state: StochasticState) -> Tree:
        t, lam = state.step, state.lam
        rho = self.rate(self.step_size, t)
        rho_y = rho if self.y_step_size is None else self.rate(self.y_step_size, t)
        rho_z = rho if self.z_step_size is None else self.rate(self.z_step_size, t)
        x_flat, x_spec = leaves(x)
        y_flat, y_spec = leaves(state.y)
        z_flat = leaves_like(state.z, y_spec, "second lower iterate z")
        xs, ys, zs = requires_grad(x_flat), requires_grad(y_flat), requires_grad(z_flat)
        gb, fb = self.draw()
        g = self.lower.objective
        _, gx_z, gz = partials(g, xs, x_spec, zs, y_spec, gb)
        _, gx_y, gy = partials(g, xs, x_spec, ys, y_spec, gb)
        _, fx, fy = partials(self.upper, xs, x_spec, ys, y_spec, fb)
        gx_z, gz, gx_y, gy, fx, fy = self.average(gx_z, gz, gx_y, gy, fx, fy)
        state.z = unflatten(self.project([a - rho_z * d for a, d in zip(z_flat, gz)], y_spec), y_spec)
        fy_scale, gy_scale = (rho_y / lam, rho_y) if self.scale_y_step else (rho_y, rho_y * lam)
        state.y = unflatten(self.project([a - fy_scale * b - gy_scale * d for a, b, d in zip(y_flat, fy, gy)], y_spec),
                            y_spec)
        state.step = t + 1
        if self.lam_schedule is not None:
            state.lam = self._scheduled_lam(t + 1)
        elif self.lam_growth is not None:
            state.lam = lam + self.lam_growth(t)
        return unflatten([a + lam * (b - c) for a, b, c in zip(fx, gx_y, gx_z)], x_spec)
