r"""Hyperparameter optimization by hypergradient descent: per-feature L2 weights on scikit-learn's digits.

The bi-level problem (x: log-regularization weights, one per input pixel; y = (W, b): a multinomial
logistic regression):

.. math::

    \min_{x \in \mathbb{R}^{64}} F(x) = \mathrm{CE}_{\mathrm{val}}(W^\star(x), b^\star(x))
    \quad\text{s.t.}\quad (W^\star, b^\star)(x) = \arg\min_{W, b}\ \mathrm{CE}_{\mathrm{train}}(W, b)
    + \tfrac12 \sum_j e^{x_j} \|W_{j,:}\|^2 .

The lower problem is strongly convex (in W; the bias has one flat direction, a shift of every class); it is
solved by heavy-ball gradient descent warm-started from the previous outer iteration, and
:math:`\mathrm{d}F/\mathrm{d}x` comes from :class:`bilevel.Implicit` (conjugate gradient on Hessian-vector
products). The outer optimizer is ``torch.optim.Adam`` on :math:`x`.

Run: ``python -m applications.hyperopt`` (about 5 s on 2 idle CPU cores).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import bilevel as bl

__all__ = ["DigitsSplits", "load_digits_splits", "make_lower", "train_loss", "val_loss", "accuracy", "run", "main", "cli"]

Params = Tuple[torch.Tensor, torch.Tensor]  # (W: (64, 10), b: (10,))


@dataclass
class DigitsSplits:
    """Standardized digits features (N, 64) and labels, split into train / validation / test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_splits(n_train: int = 300, n_val: int = 500, seed: int = 0,
                       dtype: torch.dtype = torch.float64) -> DigitsSplits:
    """Load scikit-learn's 1,797 8x8 digits (shipped with the package, offline) and split them.

    A fixed permutation (``seed``) gives ``n_train`` training, ``n_val`` validation and the remaining
    test images. Features are scaled to [0, 1] and standardized with the training split's statistics.
    A small training split makes the regularization matter.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    n = len(data.target)
    if n_train + n_val >= n:
        raise ValueError(f"load_digits_splits: n_train + n_val must be < {n}, got {n_train} + {n_val}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    x = torch.as_tensor(data.data, dtype=dtype)[perm] / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)[perm]
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    te = slice(n_train + n_val, n)
    mean = x[tr].mean(0)
    std = x[tr].std(0).clamp_min(0.1)
    x = (x - mean) / std
    return DigitsSplits(x[tr], y[tr], x[va], y[va], x[te], y[te])


def train_loss(log_lam: torch.Tensor, params: Params, data: DigitsSplits) -> torch.Tensor:
    r"""Lower objective :math:`g`: training cross-entropy plus :math:`\tfrac12\sum_j e^{x_j}\|W_{j,:}\|^2`."""
    W, b = params
    ce = F.cross_entropy(data.x_train @ W + b, data.y_train)
    return ce + 0.5 * (log_lam.exp()[:, None] * W * W).sum()


def val_loss(log_lam: torch.Tensor, params: Params, data: DigitsSplits) -> torch.Tensor:
    """Upper objective :math:`f`: validation cross-entropy (it depends on ``x`` only through the weights)."""
    W, b = params
    return F.cross_entropy(data.x_val @ W + b, data.y_val)


def accuracy(params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` whose arg-max logit under the linear model ``params = (W, b)`` equals the label ``y``."""
    W, b = params
    return float(((x @ W + b).argmax(1) == y).double().mean())


def make_lower(data: DigitsSplits, log_lam: torch.Tensor, steps: int) -> bl.LowerProblem:
    r"""The lower problem, solved by ``steps`` heavy-ball steps (gradient descent with momentum 0.9) of size :math:`1/L`.

    The problem grows ill-conditioned as the weights fall (condition number from about 40 to :math:`10^5`, see the
    tutorial): plain gradient descent from a warm start then barely lowers the residual in 100 steps, which the
    default convergence check reports; with momentum the same 100 steps solve it (``tests/hyperopt``).

    :math:`L = \tfrac12\lambda_{\max}(X^\top X / n) + \max_j e^{x_j}` bounds the Hessian of ``train_loss``
    (the softmax cross-entropy's Hessian is at most half the feature covariance).
    """
    xt = data.x_train
    lipschitz = 0.5 * float(torch.linalg.eigvalsh(xt.T @ xt / xt.shape[0]).max()) + float(log_lam.detach().exp().max())
    solver = bl.SGD(step_size=1.0 / lipschitz, steps=steps, momentum=0.9)
    return bl.LowerProblem(lambda lam, p: train_loss(lam, p, data), solver=solver)


def run(outer_steps: int = 30, lr: float = 0.3, inner_steps: int = 100, cg_iters: int = 30,
        init_log_lam: float = -2.0, strategy: Optional[bl.Strategy] = None, data: Optional[DigitsSplits] = None,
        verbose: bool = True) -> Dict[str, List[float]]:
    """Tune the 64 per-pixel L2 weights by hypergradient descent; return the history.

    Each outer step warm-starts the lower solver from the previous solution, calls :func:`bilevel.solve`,
    backpropagates the validation loss into ``log_lam.grad`` and takes an Adam step.
    """
    data = data if data is not None else load_digits_splits()
    dtype = data.x_train.dtype
    n_feat, n_cls = data.x_train.shape[1], 10
    strategy = strategy if strategy is not None else bl.Implicit(bl.CG(maxiter=cg_iters))
    log_lam = torch.full((n_feat,), init_log_lam, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([log_lam], lr=lr)
    params: Params = (torch.zeros(n_feat, n_cls, dtype=dtype), torch.zeros(n_cls, dtype=dtype))
    # Start from a well-solved lower problem, so the first hypergradient is already accurate.
    warm = make_lower(data, log_lam, 10 * inner_steps)
    params = warm.solver.run(warm, log_lam, params)
    history: Dict[str, List[float]] = {"val_loss": [], "val_acc": [], "test_acc": [], "mean_log_lam": []}
    for step in range(outer_steps + 1):
        lower = make_lower(data, log_lam, inner_steps)
        opt.zero_grad()
        w = bl.solve(lower, log_lam, params, strategy)
        loss = val_loss(log_lam, w, data)
        params = tuple(t.detach() for t in w)
        history["val_loss"].append(float(loss.detach()))
        history["val_acc"].append(accuracy(params, data.x_val, data.y_val))
        history["test_acc"].append(accuracy(params, data.x_test, data.y_test))
        history["mean_log_lam"].append(float(log_lam.detach().mean()))
        if verbose and (step % 5 == 0 or step == outer_steps):
            print(f"outer step {step:3d}  val loss {history['val_loss'][-1]:.4f}  val acc {history['val_acc'][-1]:.3f}  "
                  f"test acc {history['test_acc'][-1]:.3f}  mean log-lambda {history['mean_log_lam'][-1]:+.2f}")
        if step == outer_steps:
            break
        loss.backward()
        opt.step()
    return history


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    """Parse the command line, run :func:`run`, print the validation loss and test accuracy; return the history."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--cg-iters", type=int, default=30)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hist = run(args.outer_steps, args.lr, args.inner_steps, args.cg_iters)
    print(f"validation loss {hist['val_loss'][0]:.4f} -> {hist['val_loss'][-1]:.4f} in {time.perf_counter() - t0:.1f} s")
    return hist


if __name__ == "__main__":
    main()


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The ``bilevel-hyperopt`` command: :func:`main`, exit status 0."""
    main(argv)
    return 0
