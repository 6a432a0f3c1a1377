r"""One outer iteration of a stochastic bi-level method, written the way users run it with ``bilevel``:
the loops shared by ``stochastic_quadratic.py`` and ``benchopt_quadratic.py``.

* :func:`single_loop_iteration` (SOBA, F2SA, BOME): ``x.grad = method.step(x, state)`` (the method moves its
  lower iterates in ``state`` and returns its estimate of :math:`\nabla h(x)`), then the ``torch.optim`` step on x
  (and the learning-rate scheduler's, if any).
* :func:`solve_iteration` (AmIGO, StocBiO): :math:`y = \mathrm{solve}(x, z)` warm-started at the previous lower
  solution, ``f(x, y, batch).backward()`` on an upper mini-batch (the strategy supplies the hypergradient through
  y), the optimizer's step, then :math:`z \leftarrow y`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402

__all__ = ["single_loop_iteration", "solve_iteration"]

Iteration = Callable[[], None]


def single_loop_iteration(method: Any, x: torch.Tensor, opt: torch.optim.Optimizer, state: Any,
                          scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None) -> Iteration:
    """``method.step`` as the gradient of x, then ``opt.step()`` (and ``scheduler.step()``)."""

    def iteration() -> None:
        x.grad = method.step(x, state)
        opt.step()
        if scheduler is not None:
            scheduler.step()

    return iteration


def solve_iteration(lower: bl.LowerProblem, strategy: Any, f: Callable[..., torch.Tensor], outer: Callable[[], Any],
                    x: torch.Tensor, opt: torch.optim.Optimizer, z0: torch.Tensor) -> Iteration:
    """Solve the lower problem from the last solution (``z0`` at first), back-propagate ``f(x, y, outer())``,
    step x, keep y (detached) as the next warm start."""
    z = [z0]

    def iteration() -> None:
        y = bl.solve(lower, x, z[0], strategy, check_finite=False)
        f(x, y, outer()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        z[0] = y.detach()

    return iteration
