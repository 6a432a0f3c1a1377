r"""A lower solver that runs any ``torch.optim`` optimizer, on mini-batches if given."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import torch

from ._autodiff import detach_tree
from ._tree import Tree, is_vmapped, leaves, unflatten
from .convergence import HypergradientWarning
from .problem import LowerProblem
from .solvers import Solver, check_steps, with_weight_decay
from .stochastic.batches import BatchSource, as_batches
from .stochastic.parallel import DataParallel, mean_over

__all__ = ["TorchOptim"]

# optimizers whose weight_decay adds omega * y to the gradient (an L2 term), unless decoupled_weight_decay=True
_L2_DECAY = (torch.optim.SGD, torch.optim.Adam, torch.optim.Adamax, torch.optim.Adadelta, torch.optim.Adagrad,
             torch.optim.ASGD, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop)

_NOT_DIFFERENTIABLE = ("TorchOptim runs whole solves without a graph: use it with Implicit, FirstOrder or the stochastic "
                       "strategies, and a differentiable solver (GradientDescent, ...) with Unrolled")


class TorchOptim(Solver):
    r"""Run ``optimizer`` (``torch.optim.SGD``, ``Adam``, ...) for ``steps`` steps on the lower variable.

    Each step draws a batch :math:`B_k` from ``batches`` (if given), takes the optimizer's step on
    :math:`\nabla_y g(x, y, B_k)` (``g(x, y)`` without batches) and projects onto the constraint set:
    :math:`y \leftarrow \mathrm{Proj}_C(\mathrm{opt}(y, \nabla_y g))`. The optimizer (and its state, e.g.
    momentum) is created afresh from ``init`` at every solve; warm-start by passing the previous solution
    as ``init``.

    It returns only the solution, without a graph, which is what :class:`~bilevel.Implicit`,
    :class:`~bilevel.FirstOrder` and the stochastic strategies need; :class:`~bilevel.Unrolled`
    needs a differentiable solver (:class:`~bilevel.GradientDescent`, ...) and is refused.

    Args:
        optimizer: a ``torch.optim.Optimizer`` class, or any ``params -> optimizer`` factory. ``LBFGS`` gets a
            closure (it evaluates :math:`g` several times per step, on the step's batch) and is refused with a
            constraint: its inner iterations are unconstrained, so projecting after the step is not the solution.
        steps: number of steps.
        batches: a batch source (callable, iterable or ``DataLoader``; see :func:`bilevel.stochastic.as_batches`),
            or ``None`` for the full objective ``g(x, y)``.
        parallel: a :class:`~bilevel.stochastic.DataParallel`: each evaluation's gradient (and value) is averaged
            over the ranks (one ``all_reduce`` per evaluation: per step, or per LBFGS evaluation), so P processes
            step as one process on the concatenated batch.
        **options: passed to the optimizer (``lr``, ``momentum``, ``betas``, ...).
    """

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], steps: int, *,
                 batches: Optional[BatchSource] = None, parallel: Optional[DataParallel] = None, **options: Any) -> None:
        check_steps("TorchOptim", steps)
        if not callable(optimizer):
            raise TypeError(f"TorchOptim: optimizer must be a torch.optim.Optimizer class or factory, got {optimizer!r}")
        self.optimizer, self.steps, self.options = optimizer, int(steps), options
        self.batches = as_batches(batches)
        self.parallel = parallel
        self._decay_reported = False  # a decay minimized() cannot see is reported once per solver

    def __repr__(self) -> str:
        name = getattr(self.optimizer, "__name__", repr(self.optimizer))
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"TorchOptim({name}, steps={self.steps}{opts}{', batches=...' if self.batches else ''})"

    def step(self, lower: LowerProblem, x: Tree, y: Tree, *, create_graph: bool) -> Tree:
        raise TypeError(_NOT_DIFFERENTIABLE)

    def minimized(self, lower: LowerProblem) -> LowerProblem:
        """``lower`` plus the L2 term of ``weight_decay`` for the optimizers that add :math:`\\omega y` to the gradient
        (``SGD``, ``Adam``, ``Adamax``, ``Adadelta``, ``Adagrad``, ``ASGD``, ``NAdam``, ``RAdam``, ``RMSprop``, unless
        ``decoupled_weight_decay=True``): their fixed points minimize :math:`g + \\tfrac{\\omega}{2}\\|y\\|^2`."""
        decay = float(self.options.get("weight_decay", 0.0) or 0.0)
        if decay and self._l2_decay_class():
            return with_weight_decay(lower, decay)
        return lower

    def _l2_decay_class(self) -> bool:
        """Whether ``optimizer`` is a class whose ``weight_decay`` is an L2 term of the gradient."""
        return (isinstance(self.optimizer, type) and issubclass(self.optimizer, _L2_DECAY)
                and not self.options.get("decoupled_weight_decay", False))

    def run(self, lower: LowerProblem, x: Tree, init: Tree, *, differentiable_steps: int = 0) -> Tree:
        if differentiable_steps:
            raise TypeError(_NOT_DIFFERENTIABLE)
        if is_vmapped():
            raise TypeError("TorchOptim under vmap: a torch.optim optimizer steps real tensors, one problem at a time; "
                            "under vmap use bilevel's functional solvers (GradientDescent, SGD, Adam), or loop over tasks")
        x_d = detach_tree(x)
        y_flat, spec = leaves(init)
        ys = [t.detach().clone().requires_grad_() for t in y_flat]
        opt = self.optimizer(ys, **self.options)
        if not self._decay_reported:
            self._warn_on_unknown_decay(opt)
        objective, constrained = lower.objective, lower.constraint is not None
        several = isinstance(opt, torch.optim.LBFGS)  # evaluates g several times per step, through the closure
        if several and constrained:
            raise TypeError("TorchOptim(LBFGS) with a constraint: LBFGS's inner iterations ignore it, and projecting "
                            "after the step is not the constrained solution; use ProjectedGradient (or another "
                            "optimizer, projected after each step)")

        def closure(batch: Any) -> torch.Tensor:
            """g on this step's batch; its gradient in ``.grad`` (averaged over the ranks, with the value)."""
            with torch.enable_grad():
                y_tree = unflatten(ys, spec)
                value = objective(x_d, y_tree) if batch is None else objective(x_d, y_tree, batch)
                if not isinstance(value, torch.Tensor) or value.ndim != 0:
                    raise ValueError("TorchOptim: the lower objective must return a scalar tensor")
                grads = torch.autograd.grad(value, ys, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(ys, grads)]
            value, *grads = mean_over(self.parallel, [value.detach().to(grads[0].dtype)] + grads)
            for t, g in zip(ys, grads):
                t.grad = g
            return value

        for _ in range(self.steps):
            batch = None if self.batches is None else self.batches()  # one batch per step, however many evaluations
            if several:
                opt.step(functools.partial(closure, batch))
            else:  # one evaluation, then a plain step (an optimizer from a factory may take no closure)
                closure(batch)
                opt.step()
            if constrained:
                with torch.no_grad():
                    for t, p in zip(ys, leaves(lower.project(unflatten([t.detach() for t in ys], spec)))[0]):
                        t.copy_(p)
        return unflatten([t.detach() for t in ys], spec)

    def _warn_on_unknown_decay(self, opt: torch.optim.Optimizer) -> None:
        """Once per solver: a weight decay that :meth:`minimized` does not add to g moves the fixed point off g's
        minimizer (AdamW's decoupled decay, 0.01 by default; any decay set inside a factory)."""
        decay = max(float(group.get("weight_decay", 0.0) or 0.0) for group in opt.param_groups)
        if not decay or (self._l2_decay_class() and decay == float(self.options.get("weight_decay", 0.0) or 0.0)):
            return
        self._decay_reported = True
        why = ("is decoupled from the gradient, not the gradient of a term of g" if isinstance(self.optimizer, type)
               else "was set inside an optimizer factory, where bilevel cannot see whether it is an L2 term")
        warnings.warn(
            f"{self!r}: its weight decay ({decay:g}) {why}, so the differentiated objective is g without it, whose "
            "minimizer the solver does not reach; a hypergradient through it (Implicit, FirstOrder, the stochastic "
            "strategies) is biased. Set weight_decay=0 and put the L2 term into g, or pass the class of an optimizer "
            "whose weight_decay is an L2 term (torch.optim.Adam, SGD, ...) with weight_decay as an option.",
            HypergradientWarning, stacklevel=4)
