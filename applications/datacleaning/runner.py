r"""One method's run: SGD on the upper variable :math:`w`, the method's step, periodic evaluation.

Every ``eval_every`` outer steps the run records (host syncs only there): the wall time spent in
training steps (evaluation excluded), the full validation loss and test accuracy of the current
:math:`\theta`, and the quality (:func:`~.weights.weight_quality`) of the weights the training samples
get (for the weighting network: at their losses under the current :math:`\theta`). The baselines train
:math:`\theta` with fixed weights (1 for every sample; or 1 for the clean ones only, the oracle) by the
same mini-batch SGD.

Under ``torchrun`` every rank runs the same steps on its share of each global batch and holds the same
:math:`w` and :math:`\theta` (the methods average over the ranks), so every rank evaluates alike; the one
quantity that differs between ranks, the training time, is agreed on (the slowest rank's) before
``time_budget_s`` decides whether to go on, so that every rank stops after the same step.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

import bilevel as bl
from applications.common.errors import Diverged
from bilevel.stochastic import DataParallel

from .methods import Context, Method
from .problem import DataCleaning, Params
from .weights import weight_quality

__all__ = ["MethodDiverged", "MethodRun", "train_fixed_weights"]


class MethodDiverged(Diverged, FloatingPointError):
    """A method's validation loss became non-finite (the command exits 3; the last evaluation's state is kept)."""


class MethodRun:
    """The state of one method's run (``w``, its optimizer, the method, the history), resumable from :meth:`state_dict`.

    Args:
        method: the method (its options).
        ctx: problem, batch sizes, seed.
        theta0: the initial lower iterate.
        outer_lr: SGD's learning rate on :math:`w`, times the weighting's ``lr_scale`` (the method's ``outer_lr``
            wins when set).
        w0: the initial logit of every weight (the network's output bias).
    """

    def __init__(self, name: str, method: Method, ctx: Context, theta0: Params, outer_lr: float, w0: float = 0.0
                 ) -> None:
        self.name, self.method, self.ctx = name, method, ctx
        method.start(ctx, theta0)
        pb = ctx.problem
        self.w = pb.weighting.init(pb.n_train, w0, ctx.seed + 5, pb.data.x_train.dtype, pb.data.x_train.device)
        lr = method.outer_lr if method.outer_lr is not None else outer_lr
        self.optimizer = torch.optim.SGD([self.w], lr=lr * pb.weighting.lr_scale(pb.n_train))
        self.step = 0
        self.train_time = 0.0
        self.history: List[Dict[str, Any]] = []

    def evaluate(self) -> Dict[str, Any]:
        """Appends and returns the record at the current step."""
        pb = self.ctx.problem
        record = {"method": self.name, "step": self.step, "time_s": round(self.train_time, 4),
                  "val_loss": float(pb.val_loss(self.method.theta)),
                  "test_acc": float(pb.test_accuracy(self.method.theta)),
                  **weight_quality(pb.weight_scores(self.w.detach(), self.method.theta), pb.data.corrupted)}
        if not math.isfinite(record["val_loss"]):
            raise MethodDiverged(f"{self.name}: the validation loss is {record['val_loss']} at step {self.step}; "
                                 "lower the method's step sizes")
        self.history.append(record)
        return record

    def run(self, steps: int, eval_every: int, time_budget_s: Optional[float] = None,
            on_eval: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Outer steps until ``steps`` (or ``time_budget_s`` of training time); returns the last record."""
        if not self.history:
            record = self.evaluate()
            if on_eval:
                on_eval(record)
        while self.step < steps and (time_budget_s is None or self.train_time < time_budget_s):
            start = time.perf_counter()
            for _ in range(min(eval_every, steps - self.step)):
                self.optimizer.zero_grad(set_to_none=True)
                self.method.step(self.w)
                self.optimizer.step()
                self.step += 1
            self.train_time = self._agreed(self.train_time + time.perf_counter() - start, time_budget_s)
            record = self.evaluate()
            if on_eval:
                on_eval(record)
        return self.history[-1]

    def _agreed(self, seconds: float, time_budget_s: Optional[float]) -> float:
        """The slowest rank's training time when a time budget decides the number of steps (else this rank's)."""
        parallel = self.ctx.parallel
        if parallel is None or time_budget_s is None:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.w.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel.group)
        return float(t)

    def state_dict(self) -> Dict[str, Any]:
        return {"w": self.w.detach().clone(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "train_time": self.train_time, "history": self.history, "method": self.method.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.train_time, self.history = state["step"], state["train_time"], list(state["history"])
        self.method.load_state_dict(state["method"])


def train_fixed_weights(problem: DataCleaning, weights: torch.Tensor, theta0: Params, steps: int, batch_size: int,
                        lr: float, momentum: float, seed: int, parallel: Optional[DataParallel] = None) -> Params:
    r""":math:`\arg\min_\theta` of the loss weighted by fixed ``weights``, by ``steps`` of mini-batch SGD from ``theta0``
    (with ``parallel``: this rank's share of each global batch of ``batch_size``, the gradient averaged over ranks)."""
    batches = bl.RandomBatches(problem.n_train, batch_size, seed=seed, device=weights.device, parallel=parallel)
    solver = bl.TorchOptim(torch.optim.SGD, steps, batches=batches, parallel=parallel, lr=lr, momentum=momentum)
    lower = bl.LowerProblem(problem.weighted_loss, solver=solver)
    return solver.run(lower, weights, theta0)
