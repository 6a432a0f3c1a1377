r"""Can a better step rule make the differenced implicit gradient accurate on a ReLU network in float32?

The mixed product of Fast-BAT's implicit gradient, :math:`M w = \nabla_\theta \langle \nabla_\delta g(\theta, z), w\rangle`
(:math:`g = -\sum_i \mathrm{CE}_i`, :math:`w = -\tfrac{1}{\lambda} H_C \nabla_\delta \ell_{tr}` of a real step,
``lam = 10``), is taken by central and forward differences of :math:`\nabla_\theta g` with two step rules,
each over a sweep of a factor ``s`` on the step:

* ``batch`` (the :mod:`bilevel.differences` rule): the whole batch moves by :math:`t\, w / \lVert w\rVert`,
  :math:`t = c\,(1 + \lVert z\rVert)\, s`;
* ``per_sample``: sample :math:`i` moves by :math:`t_i\, w_i / \lVert w_i\rVert`, :math:`t_i = c\,(1 + \lVert z_i\rVert)\, s`,
  and its term is weighted by :math:`\lVert w_i\rVert / t_i` (central: :math:`/2t_i`) inside one backward
  (valid because the attack loss is a sum over samples and the network has no BatchNorm);

with :math:`c = (3\varepsilon)^{1/3}` (central) or :math:`2\varepsilon^{1/2}` (forward). Reported per row:
the relative error against the exact product in float64 and the fraction of ReLU units whose sign
differs between the two evaluation points (the kinks the difference crosses).

Model: the small ReLU CNN of ``benchmarks/fd_products.py`` (no BatchNorm), batch 128 of random
1x28x28 images, eps = 8/255, ``z`` one projected gradient step from a uniform start (float64).

Run: ``python benchmarks/fd_step_rules.py`` (about a minute on CPU), ``--tiny`` for a smoke run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, machine_info, markdown_table, write_json  # noqa: E402
from benchmarks.fd_products import ATTACK_STEP, EPS, attack_lower, small_cnn  # noqa: E402

__all__ = ["mixed_product", "differenced", "relu_patterns", "main"]

SCALES = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]


def _per_sample_loss(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, weights: Tensor) -> Tensor:
    return -(weights * F.cross_entropy(model(x + delta), y, reduction="none")).sum()


def mixed_product(model: nn.Module, x: Tensor, y: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """:math:`\\nabla_\\theta \\langle \\nabla_\\delta g(\\theta, z), w\\rangle` by double backward, flattened."""
    params = list(model.parameters())
    d = z.clone().requires_grad_()
    (gd,) = torch.autograd.grad(-F.cross_entropy(model(x + d), y, reduction="sum"), d, create_graph=True)
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad((gd * w).sum(), params)])


def relu_patterns(model: nn.Module, inp: Tensor) -> Tensor:
    """The signs of every ReLU's input at ``inp`` (a flat bool tensor)."""
    signs: List[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, i, _o: signs.append(i[0].detach() > 0))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(inp)
    for h in hooks:
        h.remove()
    return torch.cat([s.reshape(-1) for s in signs])


def differenced(model: nn.Module, x: Tensor, y: Tensor, z: Tensor, w: Tensor, central: bool, per_sample: bool,
                scale: float) -> Tuple[Tensor, float]:
    """(the differenced mixed product, the fraction of ReLU units crossed between the two points)."""
    eps = torch.finfo(z.dtype).eps
    c = (3 * eps) ** (1 / 3) if central else 2 * eps ** 0.5
    params = list(model.parameters())
    n = z.shape[0]
    if per_sample:
        wn = w.flatten(1).norm(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
        t = c * (1 + z.flatten(1).norm(dim=1)) * scale
        shift = w * (t / wn).view(-1, *[1] * (w.ndim - 1))
        weights = wn / ((2 if central else 1) * t)
    else:
        wn = w.norm().clamp_min(torch.finfo(w.dtype).tiny)
        t = c * (1 + z.norm()) * scale
        shift = w * (t / wn)
        weights = torch.full((n,), float(wn / ((2 if central else 1) * t)), dtype=z.dtype)

    def grad_at(delta: Tensor) -> Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(_per_sample_loss(model, x, y, delta, weights),
                                                                   params)])

    lo = z - shift if central else z
    product = grad_at(z + shift) - grad_at(lo)
    crossed = (relu_patterns(model, x + z + shift) != relu_patterns(model, x + lo)).double().mean()
    return product, float(crossed)


def setup(batch: int, width: int, hidden: int, shape: Sequence[int], seed: int = 0):
    torch.manual_seed(seed)
    model = small_cnn(width=width, hidden=hidden).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,), generator=gen)
    z0 = bl.Box(-x, 1 - x).project((2 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 1) * EPS)
    lower = attack_lower(model, x, y, bl.ProjectedGradient(step_size=ATTACK_STEP, steps=1))
    params = dict(model.named_parameters())
    z = bl.solve(lower, params, z0, bl.FirstOrder())
    # w = -(1/lam) H_C grad_delta l_tr at delta* = Proj_C(z - step grad g(z)), lam = 10
    _, gz = lower.value_and_grad(params, z)
    u = z - ATTACK_STEP * gz
    delta = lower.project(u)
    free = (delta == u)
    d = delta.detach().requires_grad_()
    (v,) = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)
    w = -0.1 * free * v
    return model, x, y, z.detach(), w


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "fd_step_rules_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = dict(batch=8, width=4, hidden=16, shape=(1, 12, 12)) if args.tiny else dict(
        batch=128, width=32, hidden=128, shape=(1, 28, 28))
    model64, x64, y, z64, w64 = setup(**spec)
    ref = mixed_product(model64, x64, y, z64, w64)
    rows = []
    for dtype in (torch.float64, torch.float32):
        model = model64 if dtype == torch.float64 else small_cnn(width=spec["width"], hidden=spec["hidden"])
        if dtype != torch.float64:
            model.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
        x, z, w = x64.to(dtype), z64.to(dtype), w64.to(dtype)
        exact_err = float((mixed_product(model, x, y, z, w).double() - ref).norm() / ref.norm())
        rows.append({"precision": str(dtype)[6:], "variant": "exact", "rule": "-", "scale": None,
                     "rel_err_vs_exact_float64": exact_err, "relu_crossed_fraction": 0.0})
        for central in (True, False):
            for per_sample in (False, True):
                for scale in SCALES:
                    prod, crossed = differenced(model, x, y, z, w, central, per_sample, scale)
                    rows.append({"precision": str(dtype)[6:], "variant": "central" if central else "forward",
                                 "rule": "per_sample" if per_sample else "batch", "scale": scale,
                                 "rel_err_vs_exact_float64": float((prod.double() - ref).norm() / ref.norm()),
                                 "relu_crossed_fraction": crossed})
                    print(f"{rows[-1]['precision']:8s} {rows[-1]['variant']:8s} {rows[-1]['rule']:10s} "
                          f"s={scale:<7g} err {rows[-1]['rel_err_vs_exact_float64']:.3e}  crossed {crossed:.2e}",
                          flush=True)
    print(markdown_table(["precision", "variant", "rule", "scale", "rel. error", "ReLU crossed"],
                         [[r["precision"], r["variant"], r["rule"], r["scale"], r["rel_err_vs_exact_float64"],
                           r["relu_crossed_fraction"]] for r in rows]))
    out = {"benchmark": "fd_step_rules", "machine": machine_info("cpu"), "load_average": load_average(),
           "model": "small ReLU CNN of benchmarks/fd_products.py", **{k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in spec.items()},
           "eps": EPS, "lam": 10.0, "rows": rows}
    print(f"wrote {write_json(args.out, out)}")
    return out


if __name__ == "__main__":
    main()
