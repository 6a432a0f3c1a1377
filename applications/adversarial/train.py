"""Command line: train a model adversarially (or resume a run).

    bilevel-train                                       # the quickstart config
    bilevel-train --config applications/adversarial/configs/cifar10_fast_bat_8.yaml data.path=/data/cifar10
    bilevel-train --resume runs/<name>                  # continue from runs/<name>/last.pt
    torchrun --nproc_per_node 2 -m applications.adversarial.train --config ...   # data parallel

(also ``python -m applications.adversarial ...`` or ``python applications/adversarial/train.py ...``)

Overrides are ``key.sub=value`` (YAML values; fractions such as ``method.eps=8/255`` work). With
``--resume RUN_DIR`` the run's stored config is the base (``--config`` and overrides may change
anything but the model, the dataset and the method/eps, which must match the checkpoint; e.g.
``train.epochs=30`` extends a run, and the cyclic schedule is then recomputed over the new length).
``train.batch_size`` is the global batch, split evenly over torchrun's processes.

Exit codes: 0 done; 2 invalid configuration, unusable run directory or checkpoint, unreadable data
(the message names the file), an output folder that cannot be written (full, read-only), an
unavailable device; 3 training diverged (a NaN/Inf or exploding loss, or exploding weights; the
diverged epoch is not saved, the last good checkpoint is kept). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from applications.adversarial.checkpoint import CheckpointError, load
from applications.adversarial.config import EXIT_CONFIG, QUICKSTART, ConfigError, load_config, read_yaml
from applications.adversarial.data import DataError
from applications.adversarial.distributed import DeviceError
from applications.adversarial.trainer import (
    EXIT_DIVERGED,
    ConsoleHandler,
    RunDirError,
    TrainingDiverged,
    resumable_checkpoint,
    train,
)

__all__ = ["build_parser", "log_to_console", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bilevel-train``."""
    p = argparse.ArgumentParser(prog="bilevel-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
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


def main(argv: Optional[List[str]] = None) -> int:
    """The train command; returns its exit status."""
    args = build_parser().parse_args(argv)
    log_to_console()
    try:
        if args.resume is not None:
            base = load(resumable_checkpoint(args.resume))["config"]
            if args.config is not None:
                base = read_yaml(args.config)
            cfg = load_config(None, args.overrides, base=base)
            results = train(cfg, run_dir=args.resume, resume=True, progress=False if args.no_progress else None)
        else:
            cfg = load_config(args.config or QUICKSTART, args.overrides)
            results = train(cfg, progress=False if args.no_progress else None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (RunDirError, CheckpointError, DataError, DeviceError, ImportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if os.environ.get("RANK", "0") == "0":
        print(f"results: {Path(results['run_dir']) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
