"""``python -m applications.datacleaning [--config FILE] [--results FILE] [key.sub=value ...]``.

Runs the configured methods and the two baselines on the data-cleaning problem (default
:data:`~.config.DEFAULT_CONFIG`: MNIST 5k, p = 0.5, the linear model, every method) and prints the table.
``--results X.json`` also writes ``results.json`` to ``X.json`` and the plot to ``X.png`` (e.g. under
``benchmarks/results/``). Exit status 2 on an
invalid configuration or an incompatible checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from applications.adversarial.checkpoint import CheckpointError
from applications.adversarial.config import EXIT_CONFIG
from applications.adversarial.records import write_json

from .config import ConfigError, load_config


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m applications.datacleaning", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", help="YAML run configuration (default: configs/mnist_linear.yaml)")
    parser.add_argument("--results", help="also write the results JSON to this path (and the plot next to it, .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 methods=[amigo]")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from .experiment import run_experiment

    try:
        results = run_experiment(cfg, progress=not args.no_progress)
    except CheckpointError as exc:
        print(f"error: {exc} (set output.overwrite=true to start afresh)", file=sys.stderr)
        return EXIT_CONFIG
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        plot = Path(cfg.output.dir) / cfg.run_name() / "plot.png"
        if plot.is_file():
            shutil.copyfile(plot, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
