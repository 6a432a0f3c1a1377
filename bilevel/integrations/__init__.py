"""Optional adapters to other libraries. Each submodule imports its library lazily.

* :mod:`bilevel.integrations.betty` — ``bilevel`` hypergradients (implicit with constraints, linearized,
  first order) as Betty (betty-ml 0.2.1) best-response-Jacobian methods, and a constrained lower problem.
"""

__all__ = ["betty"]
