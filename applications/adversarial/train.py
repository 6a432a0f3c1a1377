"""Command line: train a model adversarially (or resume a run).

    bilevel-train                                       # the quickstart config
    bilevel-train --config applications/adversarial/configs/cifar10_fast_bat_8.yaml data.path=/data/cifar10
    bilevel-train --resume runs/<name>                  # continue from runs/<name>/last.pt
    torchrun --nproc_per_node 2 -m applications.adversarial.train --config ...   # data parallel

(also ``python -m applications.adversarial ...`` or ``python applications/adversarial/train.py ...``)

Overrides are ``key.sub=value`` (YAML values; fractions such as ``method.eps=8/255`` work), before or
after the options. With ``--resume RUN_DIR`` the config stored in the run's last.pt is the base
(``--config`` and overrides may change anything but the seed, the model, the dataset and its split, and
the method/eps, which define the run; e.g. ``train.epochs=30`` extends a run, and the cyclic schedule is
then recomputed over the new length). Every change is recorded (``config_changes`` in last.pt and
results.json, and a note in train.log). A hand edit of the run's config.yaml is refused, not ignored:
pass the change as an override. ``train.batch_size`` is the global batch, split evenly over torchrun's
processes. One process at a time holds a run directory; a second one exits 2 naming the first's pid.

Exit codes: 0 done; 2 invalid configuration, unusable or busy run directory or checkpoint, unreadable
data (the message names the file), an output folder that cannot be written (full, read-only), an
unavailable device; 3 training diverged (a NaN/Inf or exploding loss, or exploding weights; the
diverged epoch is not saved, the last good checkpoint is kept); 130 / 143 interrupted by SIGINT
(Ctrl-C) / SIGTERM (the last checkpoint is kept, and one line says how to resume). Errors are one line
on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from applications.adversarial.config import QUICKSTART, load_config
from applications.adversarial.guard import stored_config
from applications.adversarial.reference import reference_line
from applications.adversarial.trainer import ConsoleHandler, train
from applications.common.cli import ResumeHint, help_text, parse_args, run_command
from applications.common.distributed import env_int
from applications.common.errors import UserError
from applications.common.yamlfile import read_yaml

__all__ = ["build_parser", "log_to_console", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bilevel-train``."""
    p = argparse.ArgumentParser(prog="bilevel-train", description=help_text(__doc__.split("\n\n")[0]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=help_text(__doc__.split("\n\n", 1)[1]))
    p.add_argument("--config", type=Path, default=None, help=f"YAML config (default: {QUICKSTART.name}, or the "
                   "resumed run's config)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def log_to_console() -> None:
    """The application's log messages (INFO and above) on stdout, once."""
    log = logging.getLogger("applications.adversarial")
    if not any(isinstance(h, ConsoleHandler) for h in log.handlers):
        handler = ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _train(args: argparse.Namespace, hint: ResumeHint) -> int:
    progress = False if args.no_progress else None
    try:
        if args.resume is not None:
            base = stored_config(args.resume)
            if args.config is not None:
                base = read_yaml(args.config)
            cfg = load_config(None, args.overrides, base=base)
            run_dir = Path(args.resume)
        else:
            cfg = load_config(args.config or QUICKSTART, args.overrides)
            run_dir = Path(cfg.output.dir) / cfg.run_name()
        hint.command, hint.checkpoint = f"bilevel-train --resume {run_dir}", run_dir / "last.pt"
        results = train(cfg, run_dir=run_dir, resume=args.resume is not None, progress=progress)
    except ImportError as exc:  # an optional package the config asks for
        raise UserError(str(exc)) from None
    if env_int("RANK", 0) == 0:  # rank 0 prints
        line = reference_line(cfg, results)
        if line:
            print(line)
        print(f"results: {Path(results['run_dir']) / 'results.json'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The train command; returns its exit status (see the module docstring)."""
    args = parse_args(build_parser(), argv)
    log_to_console()
    return run_command(lambda hint: _train(args, hint))


if __name__ == "__main__":
    sys.exit(main())
