r"""BatchNorm2d with a lean double backward, for the training passes of Fast-BAT's implicit gradient.

Fast-BAT's exact implicit gradient runs the training backward on through the graph of the attack's input
gradient :math:`\nabla_\delta g(\theta, z)`, so every BatchNorm layer (training mode, batch statistics) is
differentiated twice. PyTorch's rule for that second derivative is a composite of about sixty tensor
operations per layer; on PreActResNet-18 (CPU, float32) it was a quarter of the implicit term's time
(``benchmarks/step_profile.py``). This layer computes the same numbers with about sixteen passes.

Per channel, over the :math:`M = N H W` values: :math:`\mu`, :math:`\sigma^2` (biased),
:math:`r = (\sigma^2 + \epsilon)^{-1/2}`, :math:`\hat x = (x - \mu) r`, :math:`y = \gamma \hat x + \beta`. The
first backward (PyTorch's fused kernel) gives, for an output gradient :math:`g`,

.. math::

    g_\beta = \textstyle\sum g, \quad g_\gamma = \sum g \hat x, \quad
    g_x = \gamma r \big(g - g_\beta / M - \hat x\, g_\gamma / M\big).

Its derivative, for cotangents :math:`a` (of :math:`g_x`), :math:`b_\gamma`, :math:`b_\beta`, with
:math:`\bar a = \sum a / M`, :math:`q = \sum a \hat x / M`, :math:`k = \gamma r`:

.. math::

    \partial_g &= k\,(a - \bar a - q \hat x) + b_\gamma \hat x + b_\beta, \\
    \partial_\gamma &= r\,\big(\textstyle\sum a g - g_\beta \bar a - g_\gamma q\big), \\
    \partial_x &= r\,\big(G - \bar G - \hat x\, \overline{G \hat x}\big) - \tfrac{\rho r^2}{M} \hat x, \\
    G &= (b_\gamma - k q)\, g - \tfrac{k g_\gamma}{M} a, \quad
    \rho = \gamma \big(\textstyle\sum a g - g_\beta \bar a - g_\gamma q\big),

where :math:`G` is the derivative in :math:`\hat x` at fixed :math:`r` and :math:`\rho` the one in :math:`r` at fixed
:math:`\hat x` (``tests/adversarial/test_batchnorm.py`` checks all of it against PyTorch's rule and
``gradgradcheck``). Third derivatives are not provided.

The layer is an ``nn.BatchNorm2d`` (same parameters, buffers, state dict and ``isinstance``); it takes this
path only in training mode with gradients enabled and otherwise calls ``nn.BatchNorm2d.forward``.
:func:`use_lean_batchnorm` swaps it into a built model (``build_model(..., lean_batchnorm=True)``, YAML
``model: {options: {lean_batchnorm: true}}``).

Opt-in, not the default: measured on 2 CPU cores (one thread, PreActResNet-18's 17 layers at batch 32) the
second derivative takes 88 ms per Fast-BAT step instead of PyTorch's 250 ms, about 3.6% of the step; on a
GPU the forward calls ``torch.native_batch_norm`` directly (not cuDNN's kernel), so whether it pays there
is for ``benchmarks/step_cost.py --lean-bn`` to show.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["BatchNorm2d", "batch_norm_train", "use_lean_batchnorm"]

_REDUCE = (0, 2, 3)


def _channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class _BatchNormTrain(torch.autograd.Function):
    """y = BN(x) with batch statistics (running statistics updated in place); backward through _BatchNormGrad."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum: float, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple, output: Tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight = inputs[0], inputs[1]
        _, mean, invstd = output
        ctx.eps = inputs[6]
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd)

    @staticmethod
    def backward(ctx: Any, gy: Tensor, _gmean: Any, _ginvstd: Any) -> Tuple[Optional[Tensor], ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormGrad.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw, gb, None, None, None, None


class _BatchNormGrad(torch.autograd.Function):
    """(g_x, g_gamma, g_beta) of batch-statistics BatchNorm by PyTorch's fused kernel; the lean rule as its backward."""

    @staticmethod
    def forward(gy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                eps: float) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        affine = weight is not None
        return torch.ops.aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, eps,
                                                         [True, affine, affine])

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple, output: Tuple) -> None:
        gy, x, weight, mean, invstd, _ = inputs
        _, gw, gb = output
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, a: Optional[Tensor], b_gamma: Optional[Tensor], b_beta: Optional[Tensor]
                 ) -> Tuple[Optional[Tensor], ...]:
        gy, x, weight, mean, invstd, g_gamma, g_beta = ctx.saved_tensors
        f32 = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        gy_c, x_c = gy.to(f32), x.to(f32)
        m = x.numel() // x.shape[1]
        r = _channel(invstd.to(f32))
        xhat = torch.addcmul(_channel(-mean.to(f32)) * r, x_c, r)
        gamma = _channel(weight.to(f32)) if weight is not None else torch.ones_like(r)
        # the first backward's channel sums (its outputs when affine)
        sum_g = g_beta.to(f32) if g_beta is not None else gy_c.sum(_REDUCE)
        sum_gx = g_gamma.to(f32) if g_gamma is not None else (gy_c * xhat).sum(_REDUCE)
        bg = _channel(b_gamma.to(f32)) if b_gamma is not None else torch.zeros_like(r)
        bb = _channel(b_beta.to(f32)) if b_beta is not None else torch.zeros_like(r)
        k = gamma * r
        if a is not None:
            a_c = a.to(f32)
            a_bar = _channel(a_c.sum(_REDUCE) / m)
            q = _channel((a_c * xhat).sum(_REDUCE) / m)
            inner = _channel((a_c * gy_c).sum(_REDUCE)) - _channel(sum_g) * a_bar - _channel(sum_gx) * q
            d_gy = torch.addcmul(bb - k * a_bar, bg - k * q, xhat).addcmul_(k, a_c)
            big_g = (gy_c * (bg - k * q)).addcmul_(a_c, -k * _channel(sum_gx) / m)
            d_gamma = (r * inner).reshape(-1)
            rho = gamma * inner
        else:
            d_gy = torch.addcmul(bb, bg, xhat)
            big_g = gy_c * bg
            d_gamma = None
            rho = torch.zeros_like(r)
        g_bar = _channel(big_g.sum(_REDUCE) / m)
        gx_bar = _channel((big_g * xhat).sum(_REDUCE) / m)
        d_x = torch.addcmul(-r * g_bar, -r * gx_bar - rho * r * r / m, xhat).addcmul_(big_g, r)
        d_w = d_gamma.to(weight.dtype) if (weight is not None and d_gamma is not None) else None
        return d_gy.to(gy.dtype), d_x.to(x.dtype), d_w, None, None, None


def batch_norm_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], momentum: float, eps: float) -> Tensor:
    r"""``F.batch_norm(..., training=True)`` for a 4-D input, twice differentiable with the lean second derivative."""
    return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps)[0]


def _functorch_wrapped(t: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode forward is :func:`batch_norm_train` (see the module docstring).

    Same arguments, parameters, buffers and running-statistics semantics (momentum, ``momentum=None``
    cumulative average, ``num_batches_tracked``, ``track_running_stats=False``). Evaluation mode, code under
    ``torch.no_grad`` and ``torch.func`` transforms use ``nn.BatchNorm2d.forward`` unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()) or x.dim() != 4 or _functorch_wrapped(x):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average (as nn.BatchNorm2d: reads the counter)
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats
        return batch_norm_train(x, self.weight, self.bias, self.running_mean if tracked else None,
                                self.running_var if tracked else None, factor, self.eps)


def use_lean_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.BatchNorm2d`` of ``model`` (in place) by :class:`BatchNorm2d` with the same
    options, state, device, dtype and mode; returns ``model``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                ref = next(itertools.chain(child.parameters(), child.buffers()), None)
                like = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
                lean = BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, **like)
                lean.load_state_dict(child.state_dict())
                setattr(module, name, lean.train(child.training))
    return model
