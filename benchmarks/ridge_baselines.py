"""The hypergradients on per-feature ridge that :mod:`benchmarks.hypergrad_ridge` sets against ``bilevel``'s: a
plain double-backward CG written by hand (the floor for an iteration count), Betty's and TorchOpt's own code paths.

Each builder takes the problem (:class:`benchmarks.hypergrad_ridge.Ridge`: ``g(lam, w)``, ``f(w)``, ``lam`` and the
exact lower solution ``w_star``) and returns a closure computing dF/dlam, the setup excluded from its timing. Betty and
TorchOpt are imported inside their builders: the benchmark lists them only where they are importable.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

import torch

if TYPE_CHECKING:
    from benchmarks.hypergrad_ridge import Ridge

__all__ = ["betty_hypergrad", "handwritten_cg", "torchopt_hypergrad"]

HyperFn = Callable[[], torch.Tensor]


def handwritten_cg(p: Ridge, iters: int) -> HyperFn:
    """The floor: one double-backward graph of grad_w g, ``iters`` plain CG iterations, one mixed product."""

    def run() -> torch.Tensor:
        lam = p.lam.detach().requires_grad_()
        w = p.w_star.detach().requires_grad_()
        gw = torch.autograd.grad(p.g(lam, w), w, create_graph=True)[0]
        v = torch.autograd.grad(p.f(w), w)[0]
        u = torch.zeros_like(v)
        r = v.clone()
        q = r.clone()
        rs = r @ r
        for _ in range(iters):
            Aq = torch.autograd.grad(gw, w, q, retain_graph=True)[0]
            alpha = rs / (q @ Aq)
            u = u + alpha * q
            r = r - alpha * Aq
            rs_new = r @ r
            q = r + (rs_new / rs) * q
            rs = rs_new
        return -torch.autograd.grad(gw, lam, u)[0]
    return run


def _betty_problems(p: Ridge, config_kwargs: Dict[str, Any]) -> Tuple[Any, Any]:
    from betty.configs import Config
    from betty.problems import ImplicitProblem

    class Holder(torch.nn.Module):
        def __init__(self, value: torch.Tensor) -> None:
            super().__init__()
            self.value = torch.nn.Parameter(value.detach().clone())

    class Upper(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return p.f(self.lower_problem.module.value)

    class Lower(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return p.g(self.upper_problem.module.value, self.module.value)

    upper = Upper("upper", Config(type="darts", retain_graph=True), module=Holder(p.lam))
    lower = Lower("lower", Config(**config_kwargs), module=Holder(p.w_star))
    upper.lower_problem, lower.upper_problem = lower, upper
    lower.cur_batch = None
    return upper, lower


def betty_hypergrad(p: Ridge, **config_kwargs: Any) -> HyperFn:
    """Betty's own code path for one hypergradient: ``get_grads`` on the path upper -> lower -> upper."""
    from betty.hypergradient import get_grads

    upper, lower = _betty_problems(p, config_kwargs)
    path = [upper, lower, upper]

    def run() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = upper.training_step(None)
            return get_grads(loss, path, retain_graph=False, do_sync=False)[0]
    return run


def torchopt_hypergrad(p: Ridge, iters: int, normal: bool) -> HyperFn:
    """TorchOpt's ``custom_root``: the optimality condition grad_w g = 0, its default normal-equation CG or plain CG."""
    import torchopt

    solve = (torchopt.linear_solve.solve_normal_cg(maxiter=iters, rtol=0.0) if normal
             else torchopt.linear_solve.solve_cg(maxiter=iters, rtol=0.0))
    grad_w = torch.func.grad(p.g, argnums=1)

    def optimality(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return grad_w(lam, w)

    w_star = p.w_star

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w_init: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return w_star.clone()

    def run() -> torch.Tensor:
        lam = p.lam.detach().requires_grad_()
        w = solver(torch.zeros_like(w_star), lam)
        return torch.autograd.grad(p.f(w), lam)[0]
    return run
