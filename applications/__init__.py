"""Applications of the bilevel core, each a package with its own command: adversarial training (Fast-AT,
Fast-BAT and peers; ``bilevel-train``, ``bilevel-evaluate``), hyperparameter optimization
(``bilevel-hyperopt``) and data cleaning (per-sample weights under label noise by the stochastic
methods; ``bilevel-datacleaning``). They share ``applications/common`` (the run layer: exit codes, command
line, config loading, atomic writes, checkpoints, run-directory lock, interrupts) and
``applications/vision`` (datasets, loaders, the small CNN), and never import one another."""
