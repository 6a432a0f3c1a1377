"""What every application shares to run: one module per concept.

* :mod:`~applications.common.errors`: the exit-code policy (2 user error, 3 diverged, 130 / 143 interrupted);
* :mod:`~applications.common.cli`: one command-line grammar (options and overrides in any order) and the
  way out of a command (one-line errors, SIGINT / SIGTERM);
* :mod:`~applications.common.config`: configuration errors (capped lists), value types, option checks;
* :mod:`~applications.common.yamlfile`: reading YAML (no repeated keys, UTF-8 only) and overrides;
* :mod:`~applications.common.atomic`: atomic writes with per-process temporaries, stale-temporary removal;
* :mod:`~applications.common.checkpoint`: weights-only checkpoints that carry their run kind, RNG state,
  resume compatibility;
* :mod:`~applications.common.rundir`: the exclusive lock of a run directory;
* :mod:`~applications.common.distributed`: the ``torchrun`` process group, reductions, and errors that stop
  every rank with one line.

No module here imports an application; the applications import these, not each other.
"""
