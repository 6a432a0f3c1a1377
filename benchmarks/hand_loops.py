r"""Hand-written PyTorch loops of SOBA, F2SA and BOME on the benchmark quadratic: the baselines of
``stochastic_quadratic.py``'s per-iteration cost.

Each builder returns ``(iterates, iteration)``: the dict of the current iterates (x under ``"x"``) and
``iteration()``, one outer iteration of the algorithm with the same objectives, the same
mini-batches (:func:`~benchmarks.quadratic_problem.samplers`), the same steps (:data:`STEPS`) and the same autograd
calls as ``bilevel``'s step, written without the library and with a plain update of x:

* SOBA (Dagréou et al., 2022): :math:`z \leftarrow z - \rho\nabla_z g`, :math:`v \leftarrow v - \rho(\nabla^2_{zz}g\,v
  + \nabla_z f)`, :math:`x \leftarrow x - \gamma(\nabla^2_{xz}g\,v + \nabla_x f)`, one inner and one outer batch;
* F2SA (Kwon et al., 2023): z on g, y on :math:`f/\lambda + g`, x on :math:`\nabla_x f + \lambda(\nabla_x g(x, y) -
  \nabla_x g(x, z))`, :math:`\lambda` growing by ``lam_growth / (t + 1)^{1/7}``;
* BOME (Liu et al., 2022): ``inner_steps`` of gradient descent on g for :math:`\theta`, then the
  value-function-gap direction with :math:`\lambda = \max(0, (\eta\|\nabla q\|^2 - \nabla f\cdot\nabla q) /
  \|\nabla q\|^2)`.

:func:`analytic_soba` is SOBA with the quadratic's derivatives written as matrix products (no autograd), the
eager floor, and under ``torch.compile`` with ``compile=True``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Tuple

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quadratic_problem import STEPS, samplers, x0, z0  # noqa: E402

__all__ = ["hand_soba", "hand_f2sa", "hand_bome", "analytic_soba", "HAND"]

Iteration = Callable[[], None]
Built = Tuple[Dict[str, Any], Iteration]  # the iterates (x under "x") and one iteration


def _grad(value, wrt, **kw):
    return torch.autograd.grad(value, wrt, **kw)


def hand_soba(P: SimpleNamespace, batch: int, seed: int) -> Built:
    s, (inner, outer) = STEPS["SOBA"], samplers(P, batch, seed)
    it = {"x": x0(P).detach(), "z": z0(P), "v": z0(P)}

    def iteration() -> None:
        x, z, v = it["x"].requires_grad_(), it["z"].requires_grad_(), it["v"]
        i, j = inner(), outer()
        with torch.enable_grad():
            (gz,) = _grad(P.g(x, z, i), z, create_graph=True)
            cross, hv = _grad(gz, (x, z), grad_outputs=v)
            fx, fz = _grad(P.f(x, z, j), (x, z))
        it["z"] = z.detach() - s["rho"] * gz.detach()
        it["v"] = v - s["rho"] * (hv + fz)
        it["x"] = x.detach() - s["gamma"] * (cross + fx)

    return it, iteration


def hand_f2sa(P: SimpleNamespace, batch: int, seed: int) -> Built:
    s, (inner, outer) = STEPS["F2SA"], samplers(P, batch, seed)
    it = {"x": x0(P).detach(), "z": z0(P), "y": z0(P), "lam": s["lam"], "t": 0}

    def iteration() -> None:
        x, y, z, lam = it["x"].requires_grad_(), it["y"].requires_grad_(), it["z"].requires_grad_(), it["lam"]
        i, j = inner(), outer()
        gxz, gz = _grad(P.g(x, z, i), (x, z))
        gxy, gy = _grad(P.g(x, y, i), (x, y))
        fx, fy = _grad(P.f(x, y, j), (x, y))
        it["z"] = z.detach() - s["rho"] * gz
        it["y"] = y.detach() - (s["rho"] / lam) * fy - s["rho"] * gy
        it["x"] = x.detach() - s["gamma"] * (fx + lam * (gxy - gxz))
        it["lam"] = lam + s["lam_growth"] / (it["t"] + 1) ** (1 / 7)
        it["t"] += 1

    return it, iteration


def hand_bome(P: SimpleNamespace, batch: int, seed: int) -> Built:
    s, (inner, outer) = STEPS["BOME"], samplers(P, batch, seed)
    it = {"x": x0(P).detach(), "y": z0(P)}

    def iteration() -> None:
        x, y = it["x"].requires_grad_(), it["y"].requires_grad_()
        i, j = inner(), outer()
        xc, theta = x.detach(), y.detach()
        for _ in range(s["inner_steps"]):
            theta = theta.requires_grad_()
            (d,) = _grad(P.g(xc, theta, i), theta)
            theta = theta.detach() - s["alpha"] * d
        (gxt,) = _grad(P.g(x, theta, i), x)
        gx, gy = _grad(P.g(x, y, i), (x, y))
        fx, fy = _grad(P.f(x, y, j), (x, y))
        qx = gx - gxt
        nq = qx @ qx + gy @ gy
        lam = torch.clamp_min((s["eta"] * nq - fx @ qx - fy @ gy) / nq.clamp_min(torch.finfo(nq.dtype).tiny), 0.0)
        it["y"] = y.detach() - s["xi"] * (fy + lam * gy)
        it["x"] = x.detach() - s["xi"] * (fx + lam * qx)

    return it, iteration


def analytic_soba(P: SimpleNamespace, batch: int, seed: int, compile: bool = False) -> Built:
    """The SOBA iteration with the quadratic's derivatives as matrix products (no autograd): the eager floor, and
    with ``compile`` the same function under ``torch.compile``."""
    s, (inner, outer), t = STEPS["SOBA"], samplers(P, batch, seed), P.t
    it = {"x": x0(P).detach(), "z": z0(P), "v": z0(P)}
    inv = 1.0 / batch

    def update(x, z, v, i, j):
        r, pc, qc = t.R[i], t.Pc[i], t.Qc[i]
        gz = inv * (r.T @ (r @ z) + qc.T @ (pc @ x)) + t.CM.T @ x + t.a[i].mean(0)
        hv = inv * (r.T @ (r @ v))
        cross = t.CM @ v + inv * (pc.T @ (qc @ v))
        rf, sh, pk, qk = t.RF[j], t.SH[j], t.Pk[j], t.Qk[j]
        fz = inv * (rf.T @ (rf @ z) + qk.T @ (pk @ x)) + t.KM.T @ x + t.fv[j].mean(0)
        fx = inv * (sh.T @ (sh @ x) + pk.T @ (qk @ z)) + t.KM @ z + t.hv[j].mean(0)
        return x - s["gamma"] * (cross + fx), z - s["rho"] * gz, v - s["rho"] * (hv + fz)

    fn = torch.compile(update) if compile else update

    def iteration() -> None:
        it["x"], it["z"], it["v"] = fn(it["x"], it["z"], it["v"], inner(), outer())

    return it, iteration


HAND: Dict[str, Callable[[SimpleNamespace, int, int], Built]] = {"SOBA": hand_soba, "F2SA": hand_f2sa, "BOME": hand_bome}
