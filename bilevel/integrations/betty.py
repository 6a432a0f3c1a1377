r"""Use ``bilevel``'s hypergradients inside a Betty (``betty-ml`` 0.2.1) :class:`~betty.Engine`.

Betty computes the upper gradient of a two-level program as the direct term plus a *best-response
Jacobian* product, and picks the function that computes the latter from the lower problem's
``Config(type=...)`` in the table ``betty.hypergradient.jvp_fn_mapping``; each entry has the signature
``fn(vector, curr, prev, sync)``, where ``vector`` :math:`= \partial f / \partial y` (the upper loss's
gradient with respect to the lower problem's parameters), ``curr`` is the lower and ``prev`` the upper
problem. It must return :math:`(\mathrm{d}y^\star/\mathrm{d}x)^\top v` for the upper parameters
:math:`x`, or, with ``sync=True``, add it to their ``.grad``.

:func:`register` puts any ``bilevel`` strategy in that table under a name of your choice, so a Betty user
writes ``Config(type=name)`` on the lower problem and gets, with no other change to the program:

* :class:`bilevel.Implicit` — the exact implicit hypergradient at the lower problem's current parameters
  :math:`y^\star`, with the masked (active-set) system when the lower problem has a box constraint; any
  linear solver (:class:`~bilevel.CG` runs correct conjugate gradients on the symmetric system).
* :class:`bilevel.Linearized` — Fast-BAT's implicit gradient
  :math:`-\tfrac{1}{\lambda} H_C \nabla^2_{y x} g(x, z)` at the linearization point :math:`z`, the lower
  iterate before its last step.
* :class:`bilevel.FirstOrder` — no implicit term (Danskin; Fast-AT, PGD-AT).

Betty has no constraints; :class:`ConstrainedProblem` adds them. Mix it into the lower problem
(``class Attack(ConstrainedProblem, ImplicitProblem)``) and set ``constraint`` (or override
``get_constraint(batch)``): after every optimizer step the parameters are projected onto the set, and the
iterate before the step is kept as ``linearization_point`` for :class:`~bilevel.Linearized`.

Fast-BAT as a Betty program (the test ``tests/integrations/test_betty.py`` runs this and checks the
gradient against ``bilevel.solve(..., Linearized)`` to float64 precision)::

    from betty.configs import Config
    from betty.problems import ImplicitProblem
    import bilevel as bl
    from bilevel.integrations import betty as bb

    bb.register("fast_bat", bl.Linearized(step=alpha, lam=10.0))

    class Attack(bb.ConstrainedProblem, ImplicitProblem):          # lower: the perturbation
        def get_constraint(self, batch):
            x, _ = batch
            return bl.LInfBall(0.0, eps, check=False) & bl.Box(-x, 1 - x, check=False)
        def training_step(self, batch):
            x, y = batch
            return -F.cross_entropy(self.classifier(x + self.module.delta), y, reduction="sum")

    class Classifier(ImplicitProblem):                                # upper: the weights
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.module(x + self.attack.module.delta), y)

    attack = Attack("attack", Config(type="fast_bat", unroll_steps=2), module=delta_module,
                    optimizer=torch.optim.SGD(delta_module.parameters(), lr=alpha), ...)
    classifier = Classifier("classifier", Config(retain_graph=True), module=model, ...)

How the lower objective is evaluated: the adapter calls the lower problem's own ``training_step`` on its
current batch with the parameters of both modules temporarily replaced by fresh leaves (so the objective
is :math:`g(x, y)` as the Betty program defines it, differentiable in both). That is one extra forward
of the lower objective per hypergradient; modules with BatchNorm in train mode update their running
statistics during it, as they do during Betty's own lower steps.

This module imports without Betty installed; Betty is imported when :func:`register` is called.
Install: ``pip install --no-deps --ignore-requires-python betty-ml==0.2.1`` (its metadata says
Python < 3.11, but it runs on 3.11 with torch 2.x; it needs only torch and numpy).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import ClosedForm, FirstOrder, Implicit, Linearized, LowerProblem, Strategy, solve

__all__ = ["register", "unregister", "BettyHypergradient", "ConstrainedProblem", "betty_available"]


def _import_betty():
    try:
        import betty.hypergradient as hypergradient
    except ImportError as exc:  # pragma: no cover - exercised only without betty
        raise ImportError(
            "bilevel.integrations.betty needs betty-ml 0.2.1: "
            "pip install --no-deps --ignore-requires-python betty-ml==0.2.1"
        ) from exc
    return hypergradient


def betty_available() -> bool:
    """True when ``betty`` (betty-ml) can be imported."""
    try:
        _import_betty()
    except ImportError:
        return False
    return True


def register(name: str, strategy: Strategy, *, overwrite: bool = False) -> str:
    """Make ``Config(type=name)`` on a Betty lower problem use ``strategy`` for its best-response Jacobian.

    Args:
        name: the ``type`` string of Betty's ``Config``; must not shadow Betty's own methods
            (``darts``, ``sama``, ``neumann``, ``cg``, ``reinforce``).
        strategy: :class:`bilevel.Implicit`, :class:`bilevel.Linearized` or :class:`bilevel.FirstOrder`.
        overwrite: replace an earlier registration under the same name.

    Returns:
        ``name``.
    """
    hypergradient = _import_betty()
    table = hypergradient.jvp_fn_mapping
    if not isinstance(strategy, Strategy):
        raise TypeError(f"register: strategy must be a bilevel strategy object, got {strategy!r}")
    BettyHypergradient._check_supported(strategy)
    existing = table.get(name)
    if existing is not None and not (overwrite and isinstance(existing, BettyHypergradient)):
        raise ValueError(
            f"register: Betty already has a hypergradient named {name!r}"
            + (" (pass overwrite=True to replace it)" if isinstance(existing, BettyHypergradient) else
               " (one of Betty's own; choose another name)")
        )
    table[name] = BettyHypergradient(strategy)
    return name


def unregister(name: str) -> None:
    """Remove a name added by :func:`register` (Betty's own methods cannot be removed)."""
    table = _import_betty().jvp_fn_mapping
    if not isinstance(table.get(name), BettyHypergradient):
        raise KeyError(f"unregister: {name!r} was not registered by bilevel")
    del table[name]


# ----------------------------------------------------------------------------------------------------------
# Evaluating the Betty lower objective as g(x, y)
# ----------------------------------------------------------------------------------------------------------

def _owners(module: nn.Module, params: Sequence[torch.Tensor]) -> List[Tuple[nn.Module, str]]:
    """(submodule, attribute) holding each parameter of ``params`` (by identity)."""
    where: Dict[int, Tuple[nn.Module, str]] = {}
    for sub in module.modules():
        for attr, p in sub._parameters.items():
            if p is not None and id(p) not in where:
                where[id(p)] = (sub, attr)
    out = []
    for i, p in enumerate(params):
        if id(p) not in where:
            raise ValueError(
                f"bilevel.integrations.betty: trainable parameter {i} (shape {tuple(p.shape)}) is not a parameter of "
                "the problem's module; the adapter evaluates the objective by substituting module parameters"
            )
        out.append(where[id(p)])
    return out


@contextlib.contextmanager
def _substituted(owners: Sequence[Tuple[nn.Module, str]], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily make ``owner.attr`` return ``value`` (a plain tensor) for each pair."""
    saved = [(m, a, m._parameters[a]) for m, a in owners]
    try:
        for (m, a), v in zip(owners, values):
            m._parameters[a] = v
        yield
    finally:
        for m, a, p in saved:
            m._parameters[a] = p


class _BettyObjective:
    r""":math:`g(x, y)`: the lower problem's ``training_step`` on its current batch, with the upper
    module's parameters replaced by ``x`` and the lower module's by ``y`` (lists of tensors)."""

    def __init__(self, curr: Any, prev: Any) -> None:
        self.curr = curr
        self.batch = curr.cur_batch
        self.x_owners = _owners(prev.module, prev.trainable_parameters())
        self.y_owners = _owners(curr.module, curr.trainable_parameters())

    def __call__(self, x: List[torch.Tensor], y: List[torch.Tensor]) -> torch.Tensor:
        with _substituted(self.x_owners, x), _substituted(self.y_owners, y):
            out = self.curr.training_step_exec(self.batch)
        loss = out["loss"] if isinstance(out, dict) else out
        return loss


class BettyHypergradient:
    r"""A ``bilevel`` strategy with Betty's best-response-Jacobian signature ``(vector, curr, prev, sync)``.

    Computes :math:`\bar x = (\mathrm{d}y^\star/\mathrm{d}x)^\top v` by building ``y = bilevel.solve(lower, x,
    init, strategy)`` at the lower problem's state and back-propagating ``vector`` through it:

    * :class:`~bilevel.Implicit`: the lower "solver" returns the current lower parameters :math:`y^\star`
      (``ClosedForm``), so only the implicit backward pass runs (masked system under a constraint).
    * :class:`~bilevel.Linearized`: :math:`y = \mathrm{Proj}_C(z - \text{step}\,\nabla_y g(x, z))` from the
      recorded ``linearization_point`` :math:`z`; autograd gives :math:`-\tfrac1\lambda H_C \nabla^2_{yx} g\, v`.
    * :class:`~bilevel.FirstOrder`: zero.
    """

    def __init__(self, strategy: Strategy) -> None:
        self._check_supported(strategy)
        self.strategy = strategy

    @staticmethod
    def _check_supported(strategy: Strategy) -> None:
        if not isinstance(strategy, (Implicit, Linearized, FirstOrder)):
            raise TypeError(
                f"bilevel.integrations.betty supports Implicit, Linearized and FirstOrder, got {type(strategy).__name__} "
                "(for unrolled differentiation use Betty's own IterativeProblem)"
            )

    def __repr__(self) -> str:
        return f"BettyHypergradient({self.strategy!r})"

    def __call__(self, vector: Sequence[torch.Tensor], curr: Any, prev: Any, sync: bool) -> Optional[List[torch.Tensor]]:
        if len(getattr(curr, "paths", [])) != 0:
            raise NotImplementedError("bilevel.integrations.betty: only two-level programs are supported "
                                      f"(problem {curr.name!r} has upper-level paths of its own)")
        x_params = list(prev.trainable_parameters())
        grads = self.vjp(vector, curr, prev)
        if sync:
            prev.set_grads(x_params, grads)
            return None
        return grads

    def vjp(self, vector: Sequence[torch.Tensor], curr: Any, prev: Any) -> List[torch.Tensor]:
        r""":math:`(\mathrm{d}y^\star/\mathrm{d}x)^\top v` as a list shaped like ``prev.trainable_parameters()``."""
        x_params = list(prev.trainable_parameters())
        y_params = list(curr.trainable_parameters())
        strategy = self.strategy
        if isinstance(strategy, FirstOrder) or (isinstance(strategy, Linearized) and strategy.ig_scale == 0.0):
            return [torch.zeros_like(p) for p in x_params]
        if len(vector) != len(y_params):
            raise ValueError(f"bilevel.integrations.betty: got {len(vector)} upper-gradient tensors for "
                             f"{len(y_params)} lower parameters (meta_trainable_parameters must equal trainable_parameters)")
        objective = _BettyObjective(curr, prev)
        constraint = _constraint_of(curr)
        y_now = [p.detach() for p in y_params]
        if isinstance(strategy, Linearized):
            init = getattr(curr, "linearization_point", None)
            if init is None:
                raise ValueError(
                    f"bilevel.integrations.betty: Linearized needs the lower problem {curr.name!r} to record its "
                    "linearization point: mix in bilevel.integrations.betty.ConstrainedProblem or set "
                    "`linearization_point` (the lower iterate before its last step) yourself"
                )
            init = [t.detach() for t in init]
            lower = LowerProblem(objective=objective, constraint=constraint)
        else:
            init = y_now
            lower = LowerProblem(objective=objective, constraint=constraint, solver=ClosedForm(lambda x: y_now))
        with torch.enable_grad():
            xs = [p.detach().requires_grad_() for p in x_params]
            y = solve(lower, xs, init, strategy, check_finite=False)
            v = [t.detach().to(dtype=yy.dtype) for t, yy in zip(vector, y)]
            grads = torch.autograd.grad(list(y), xs, grad_outputs=v, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, x_params)]


def _no_objective(x: Any, y: Any) -> torch.Tensor:  # pragma: no cover - LowerProblem used for project() only
    raise RuntimeError("bilevel.integrations.betty: this LowerProblem only projects")


def _constraint_of(problem: Any) -> Any:
    get = getattr(problem, "get_constraint", None)
    if callable(get):
        return get(problem.cur_batch)
    return getattr(problem, "constraint", None)


class ConstrainedProblem:
    r"""Mixin for a Betty lower problem with a box constraint (``bilevel`` constraints).

    Use as the first base: ``class Attack(ConstrainedProblem, ImplicitProblem)``. Each optimizer step
    (plain SGD with learning rate ``step`` reproduces :class:`bilevel.ProjectedGradient` and the value of
    :class:`bilevel.Linearized`)

    1. keeps the current parameters as ``linearization_point`` (the :math:`z` of the last step),
    2. runs the problem's own optimizer step,
    3. projects the parameters onto :math:`C` = ``get_constraint(cur_batch)`` in place.

    Attributes:
        constraint: a :class:`bilevel.Constraint` for every trainable parameter, a list of them (``None``
            for unconstrained ones), or ``None``. Override ``get_constraint(batch)`` for a per-batch set
            such as ``LInfBall(0, eps) & Box(-x, 1 - x)``.
    """

    constraint: Any = None
    linearization_point: Optional[List[torch.Tensor]] = None

    def get_constraint(self, batch: Any) -> Any:
        """The constraint for ``batch`` (default: the ``constraint`` attribute)."""
        return self.constraint

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        params = list(self.trainable_parameters())
        self.linearization_point = [p.detach().clone() for p in params]
        super().optimizer_step(*args, **kwargs)
        self.project_()

    def project_(self) -> None:
        """Project the trainable parameters onto the constraint in place (no autograd history)."""
        constraint = self.get_constraint(self.cur_batch)
        if constraint is None:
            return
        params = list(self.trainable_parameters())
        # the same constraint-to-parameter matching as the hypergradient in BettyHypergradient.vjp
        with torch.no_grad():
            projected = LowerProblem(objective=_no_objective, constraint=constraint).project(params)
            for p, q in zip(params, projected):
                if q is not p:
                    p.copy_(q)

