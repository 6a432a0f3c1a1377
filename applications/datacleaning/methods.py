r"""The methods that learn the per-sample weights, one small dataclass each; its fields are the options.

Every method keeps the lower iterate :math:`\theta` (warm-started across outer steps) and, per outer
step, leaves an estimate of :math:`\nabla_w f(\theta^\star(w))` in ``w.grad`` for the outer optimizer
(SGD on :math:`w`, see :mod:`.runner`). What each estimates, and on which batches:

* :class:`ImplicitMethod`: ``inner_steps`` SGD steps on :math:`g` (mini-batches, from the previous
  :math:`\theta`), then the exact implicit hypergradient on the *full* training set, the linear system
  solved by ``cg_steps`` of CG warm-started from the previous solution (:class:`bilevel.Implicit`).
* :class:`UnrolledMethod`: ``inner_steps`` gradient steps on one mini-batch, backpropagating through the
  last ``truncate`` (:class:`bilevel.Unrolled`).
* :class:`AmIGOMethod`, :class:`StocBiOMethod`: the inner SGD, then the linear system by warm-started SGD
  (AmIGO) or a mini-batch Neumann series (StocBiO), every product on a fresh batch.
* :class:`SOBAMethod`, :class:`F2SAMethod`, :class:`BOMEMethod`: the single-loop methods, one step on
  :math:`\theta` (and :math:`v`, :math:`z`) per outer step.

The upper gradient uses a validation mini-batch of ``val_batch_size``.

Data-parallel (``Context.parallel``, a :class:`bilevel.stochastic.DataParallel` under ``torchrun``): every
sampler draws the global batch of ``batch_size`` (``val_batch_size``, ``unroll_batch``) and returns this
rank's share, every core method averages its batch estimates over the ranks (``parallel=``), and each method
leaves in ``w.grad`` the average over ranks of the per-rank gradients, which is the gradient of the one-process
run on the concatenated batch (:mod:`bilevel.stochastic.parallel` says why averaging, not summing, is right for
per-sample weights), so the SGD step on :math:`w` is the same on every rank. The implicit method's linear
system and upper gradient are full-batch: every rank computes them whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

import bilevel as bl
from bilevel.stochastic import DataParallel

from .problem import DataCleaning, Params

__all__ = ["METHODS", "AmIGOMethod", "BOMEMethod", "Context", "F2SAMethod", "ImplicitMethod", "Method",
           "SOBAMethod", "StocBiOMethod", "UnrolledMethod", "build_method"]


#: Options that may be 0 (all other numbers must be > 0).
_MAY_BE_ZERO = ("momentum", "damping")


@dataclass
class Context:
    """What every method is built with: the problem, the (global) batch sizes, the seed of its samplers, and the
    ranks its estimates are averaged over (``parallel``; ``None``: one process)."""

    problem: DataCleaning
    batch_size: int
    val_batch_size: int
    seed: int
    parallel: Optional[DataParallel] = None


@dataclass
class Method:
    """Base: ``start(ctx, theta0)``, then ``step(w)`` per outer step (sets ``w.grad``); ``theta`` is the iterate.

    Args:
        outer_lr: the learning rate of SGD on :math:`w` for this method (``None``: the run's ``train.outer_lr``).
    """

    outer_lr: Optional[float] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if f.name in _MAY_BE_ZERO and not value >= 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
            if f.name not in _MAY_BE_ZERO and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")

    def start(self, ctx: Context, theta0: Params) -> None:
        self.ctx, self.parallel = ctx, ctx.parallel
        self.train_batches = self.batches(ctx.problem.n_train, ctx.batch_size, ctx.seed + 1)
        self.val_batches = self.batches(ctx.problem.n_val, ctx.val_batch_size, ctx.seed + 2)
        self.theta = {k: v.detach().clone() for k, v in theta0.items()}
        self.setup()

    def batches(self, n: int, batch_size: int, seed: int) -> bl.RandomBatches:
        """This rank's share of global batches of ``batch_size`` of ``range(n)`` drawn from ``seed``."""
        return bl.RandomBatches(n, batch_size, seed=seed, device=self.ctx.problem.data.x_train.device,
                                parallel=self.parallel)

    def average_grad(self, w: torch.Tensor) -> None:
        """``w.grad`` averaged over the ranks (nothing with one process)."""
        if self.parallel is not None and w.grad is not None:
            w.grad = self.parallel.mean([w.grad])[0]

    def setup(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, w: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """The iterate, the samplers and the method's own state (for checkpoints)."""
        return {"theta": self.theta, "train": self.train_batches.state_dict(), "val": self.val_batches.state_dict(),
                "own": self.own_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.theta = state["theta"]
        self.train_batches.load_state_dict(state["train"])
        self.val_batches.load_state_dict(state["val"])
        self.load_own_state(state["own"])

    def own_state(self) -> Any:
        return None

    def load_own_state(self, state: Any) -> None:
        pass


@dataclass
class _SolveThenDifferentiate(Method):
    """A strategy for :func:`bilevel.solve` over a mini-batch SGD lower solver (warm-started from ``theta``)."""

    inner_steps: int = 10
    inner_lr: float = 0.01
    momentum: float = 0.5

    def lower_problem(self) -> bl.LowerProblem:
        solver = bl.TorchOptim(torch.optim.SGD, self.inner_steps, batches=self.train_batches, parallel=self.parallel,
                               lr=self.inner_lr, momentum=self.momentum)
        return bl.LowerProblem(self.ctx.problem.lower, solver=solver)

    def setup(self) -> None:
        self.lower = self.lower_problem()
        self.strategy = self.make_strategy()

    def make_strategy(self) -> bl.Strategy:  # pragma: no cover - interface
        raise NotImplementedError

    def upper_batch(self) -> Optional[torch.Tensor]:
        return self.val_batches()

    def step(self, w: torch.Tensor) -> None:
        theta = bl.solve(self.lower, w, self.theta, self.strategy, check_finite=False)
        batch = self.upper_batch()
        self.ctx.problem.upper(w, theta, batch).backward()
        if batch is not None:  # a full-batch gradient is the same on every rank already
            self.average_grad(w)
        self.theta = {k: v.detach() for k, v in theta.items()}

    def own_state(self) -> Any:
        last = getattr(self.strategy, "last_solution", None)
        return {"last_solution": last}

    def load_own_state(self, state: Any) -> None:
        if hasattr(self.strategy, "last_solution"):
            self.strategy.last_solution = state["last_solution"]


@dataclass
class ImplicitMethod(_SolveThenDifferentiate):
    """Implicit differentiation, full-batch linear system by warm-started CG (``cg_steps`` iterations)."""

    cg_steps: int = 10
    damping: float = 0.0

    def make_strategy(self) -> bl.Strategy:
        return bl.Implicit(bl.CG(maxiter=self.cg_steps), damping=self.damping, warm_start=True)

    def upper_batch(self) -> Optional[torch.Tensor]:
        return None  # the whole validation split: the linear system is full-batch too


@dataclass
class UnrolledMethod(Method):
    """Truncated backpropagation through ``inner_steps`` gradient steps on one training batch of ``unroll_batch``
    (the steps of :class:`bilevel.SGD`, whose batch gradient is averaged over the ranks inside the graph)."""

    inner_steps: int = 10
    inner_lr: float = 0.01
    truncate: int = 5
    unroll_batch: int = 512

    def setup(self) -> None:
        self.unroll_batches = self.batches(self.ctx.problem.n_train, self.unroll_batch, self.ctx.seed + 3)
        solver = bl.SGD(self.inner_lr, self.inner_steps, parallel=self.parallel)
        self.lower = bl.LowerProblem(self.ctx.problem.lower, solver=solver)
        self.strategy = bl.Unrolled(truncate=self.truncate)

    def step(self, w: torch.Tensor) -> None:
        theta = bl.solve(self.lower.on(self.unroll_batches()), w, self.theta, self.strategy, check_finite=False)
        self.ctx.problem.upper(w, theta, self.val_batches()).backward()
        self.average_grad(w)
        self.theta = {k: v.detach() for k, v in theta.items()}

    def own_state(self) -> Any:
        return self.unroll_batches.state_dict()

    def load_own_state(self, state: Any) -> None:
        self.unroll_batches.load_state_dict(state)


@dataclass
class AmIGOMethod(_SolveThenDifferentiate):
    """AmIGO: ``system_steps`` warm-started SGD steps of size ``system_lr`` on the linear system."""

    system_steps: int = 10
    system_lr: float = 0.01

    def make_strategy(self) -> bl.Strategy:
        return bl.AmIGO(self.train_batches, steps=self.system_steps, step_size=self.system_lr, parallel=self.parallel)


@dataclass
class StocBiOMethod(_SolveThenDifferentiate):
    """StocBiO: a ``neumann_terms``-term mini-batch Neumann series with step ``system_lr``."""

    neumann_terms: int = 10
    system_lr: float = 0.01

    def make_strategy(self) -> bl.Strategy:
        return bl.StocBiO(self.train_batches, steps=self.neumann_terms, step_size=self.system_lr,
                          parallel=self.parallel)


@dataclass
class _SingleLoop(Method):
    """A single-loop method: ``step`` returns the direction for ``w`` (averaged over the ranks by the method);
    the state carries ``theta``."""

    step_size: float = 0.01

    def setup(self) -> None:
        self.method = self.make_method(bl.LowerProblem(self.ctx.problem.lower))
        self.state = self.method.init(self.theta)

    def make_method(self, lower: bl.LowerProblem) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, w: torch.Tensor) -> None:
        direction = self.method.step(w.detach(), self.state)
        w.grad = direction if w.grad is None else w.grad + direction
        self.theta = self.state.y

    def own_state(self) -> Any:
        return self.state.state_dict()

    def load_own_state(self, state: Any) -> None:
        self.state.load_state_dict(state)
        self.theta = self.state.y


@dataclass
class SOBAMethod(_SingleLoop):
    """SOBA: one step of size ``step_size`` on theta and ``v_step_size`` on v per outer step."""

    v_step_size: float = 0.01

    def make_method(self, lower: bl.LowerProblem) -> Any:
        return bl.SOBA(lower, self.ctx.problem.upper, step_size=self.step_size, v_step_size=self.v_step_size,
                       lower_batches=self.train_batches, upper_batches=self.val_batches, parallel=self.parallel)


@dataclass
class F2SAMethod(_SingleLoop):
    """F2SA: penalty ``lam`` grown by benchopt's schedule; first order."""

    lam: float = 1.0

    def make_method(self, lower: bl.LowerProblem) -> Any:
        return bl.F2SA(lower, self.ctx.problem.upper, step_size=self.step_size, lam=self.lam,
                       lower_batches=self.train_batches, upper_batches=self.val_batches, parallel=self.parallel)


@dataclass
class BOMEMethod(_SingleLoop):
    """BOME: ``inner_steps`` steps of theta's copy, then the corrected joint step ``outer_step_size`` on theta."""

    outer_step_size: float = 0.01
    inner_steps: int = 5
    eta: float = 0.5

    def make_method(self, lower: bl.LowerProblem) -> Any:
        return bl.BOME(lower, self.ctx.problem.upper, step_size=self.step_size, outer_step_size=self.outer_step_size,
                       inner_steps=self.inner_steps, eta=self.eta, lower_batches=self.train_batches,
                       upper_batches=self.val_batches, parallel=self.parallel)


#: Method names (as in the configuration) and their classes.
METHODS = {"implicit": ImplicitMethod, "unrolled": UnrolledMethod, "amigo": AmIGOMethod, "stocbio": StocBiOMethod,
           "soba": SOBAMethod, "f2sa": F2SAMethod, "bome": BOMEMethod}


def build_method(name: str, **options: Any) -> Method:
    """``METHODS[name](**options)`` (ValueError naming the valid methods when ``name`` is unknown)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name](**options)
