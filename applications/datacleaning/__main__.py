"""``bilevel-datacleaning [--config FILE] [--results FILE] [--no-progress] [key.sub=value ...]``.

Runs the configured methods and the two baselines on the data-cleaning problem (default
``applications/datacleaning/configs/mnist_linear.yaml``: MNIST 5k, p = 0.5, the linear model, every method) and prints the table.
Options and ``key.sub=value`` overrides may come in any order. ``--results X.json`` also writes
``results.json`` to ``X.json`` and the plot to ``X.png`` (e.g. under ``benchmarks/results/``). Running
the same command again resumes the run (a method whose options changed is trained again).

Exit codes: 0 done; 2 invalid configuration or ``--results`` path, a run directory in use by another
process or that cannot be written, a checkpoint of another problem or application, data that cannot be
read or is too small; 3 a method diverged (its last evaluation is kept); 130 / 143 interrupted by
SIGINT / SIGTERM (the last checkpoint is kept; the same command resumes); 4 another process of a torchrun
launch stopped (was killed). Errors are one line on stderr.

Under ``torchrun --nproc_per_node P -m applications.datacleaning ...`` (or ``python -m torch.distributed.run``)
the run is data-parallel (:mod:`.experiment`); rank 0 prints every message, including the one error line,
and the other ranks exit with the same status in silence.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from applications.common.atomic import write_json
from applications.common.cli import ResumeHint, help_text, parse_args, run_command
from applications.common.config import ConfigError
from applications.common.distributed import env_int

from .config import load_config

__all__ = ["main"]


def _check_results_path(results: Optional[str]) -> None:
    """``--results`` must name a file that can be written: checked before the run, not after it."""
    if results is None:
        return
    path = Path(results)
    if path.is_dir():
        raise ConfigError([f"--results: {path} is a directory; name a file such as {path / 'results.json'}"])
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError([f"--results: {existing} is a file, so {path} cannot be created"])


def _run(args: argparse.Namespace, argv: List[str], hint: ResumeHint) -> int:
    _check_results_path(args.results)
    cfg = load_config(args.config, args.overrides)
    from .experiment import run_experiment

    run_dir = Path(cfg.output.dir) / cfg.run_name()
    world = env_int("WORLD_SIZE", 1)
    launcher = (["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}", "-m",
                 "applications.datacleaning"] if world > 1 else ["bilevel-datacleaning"])
    hint.command = shlex.join([*launcher, *(a for a in argv if a != "output.overwrite=true")])
    hint.checkpoint = run_dir / "state.pt"
    results = run_experiment(cfg, progress=not args.no_progress)
    if args.results and env_int("RANK", 0) == 0:  # rank 0 writes
        path = Path(args.results)
        write_json(path, results)
        plot = run_dir / "plot.png"
        if plot.is_file():
            shutil.copyfile(plot, path.with_suffix(".png"))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command; returns its exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bilevel-datacleaning", description=help_text(__doc__.split("\n\n")[1]))
    parser.add_argument("--config", help="YAML run configuration (default: configs/mnist_linear.yaml)")
    parser.add_argument("--results", help="also write the results JSON to this path (and the plot next to it, .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 methods=[amigo]")
    args = parse_args(parser, argv)
    return run_command(lambda hint: _run(args, argv, hint))


if __name__ == "__main__":
    sys.exit(main())
