"""Command line: evaluate a checkpoint's clean and robust test accuracy.

    bilevel-evaluate runs/quickstart                 # best.pt of the run (else last.pt)
    bilevel-evaluate runs/x/last.pt --n 1000 --attacks clean,pgd,autoattack
    bilevel-evaluate ckpt.pt --data-path /data/cifar10 --eps 8/255

(also ``python -m applications.adversarial evaluate ...`` or ``python applications/adversarial/evaluate.py``)

The checkpoint is loaded with ``torch.load(weights_only=True)``; the model and the test data are
rebuilt from the configuration stored in it (``--data-path`` replaces the data location). Attacks:

* ``clean``: accuracy on the unperturbed images;
* ``pgd``: PGD-``--pgd-steps`` with ``--pgd-restarts`` random restarts, step ``--pgd-step-size``
  (default eps/4): the paper's PGD-50-10, in eval mode, on the first ``--n`` test images;
* ``autoattack``: standard AutoAttack through ``pyautoattack`` (``pip install "bilevel[autoattack]"``);
  skipped with a message when it is not installed.

The PGD random starts are seeded like the trainer's final test, so on the same subset and device the
numbers match the run's ``results.json`` (whatever number of processes the run used). Prints a table and
writes JSON (``--output``, default ``<checkpoint dir>/eval_<checkpoint name>.json``). Exit code 2 on a
bad option, checkpoint, config, data or device; the options and the output folder are checked before
any attack runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from applications.adversarial.build import build_run_model, load_run_data
from applications.adversarial.config import ConfigError, load_config
from applications.adversarial.distributed import DistContext, resolve_device
from applications.adversarial.evaluation import autoattack_accuracy, evaluate_clean, evaluate_robust, format_table
from applications.adversarial.guard import RUN_KIND
from applications.adversarial.methods import build_method
from applications.adversarial.seeds import Stream, mix_seed
from applications.common import checkpoint as ckpt_lib
from applications.common.cli import ResumeHint, help_text, parse_args, run_command
from applications.common.config import as_float
from applications.common.errors import EXIT_USAGE
from applications.vision.data.sources import PATH_REQUIRED

__all__ = ["AA_ATTACKS", "AA_VERSIONS", "ATTACKS", "evaluate_checkpoint", "main", "resolve_checkpoint"]

#: The attacks ``--attacks`` chooses from.
ATTACKS = ("clean", "pgd", "autoattack")
#: ``--aa-version``: a version of AutoAttack, or a comma list of these attacks of it.
AA_VERSIONS = ("standard", "plus", "rand")
AA_ATTACKS = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or a run directory's best.pt (else last.pt)."""
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no best.pt or last.pt in {path}")
    return path


def evaluate_checkpoint(path: Path, attacks: List[str], n: Optional[int] = None, batch_size: Optional[int] = None,
                        eps: Optional[float] = None, data_path: Optional[str] = None, device: Optional[str] = None,
                        pgd_steps: int = 50, pgd_restarts: int = 10, pgd_step_size: Optional[float] = None,
                        aa_version: str = "standard", log: Any = print) -> Dict[str, Any]:
    """Evaluates the checkpoint at ``path``; returns the JSON-able results."""
    path = resolve_checkpoint(path)
    ck = ckpt_lib.load(path, map_location="cpu")
    ckpt_lib.check_run_kind(ck, RUN_KIND, path)
    if not isinstance(ck.get("config"), dict) or not isinstance(ck.get("model"), dict):
        raise ckpt_lib.CheckpointError(f"{path} has no stored config/model (not written by the trainer)")
    overrides = [] if data_path is None else [f"data.path={data_path}"]
    try:
        cfg = load_config(None, overrides, base=ck["config"])
    except ConfigError as exc:
        if data_path is not None and any(p.startswith("data.path") for p in exc.problems):
            raise
        raise ckpt_lib.CheckpointError(f"{path} stores a config this version cannot use: {exc}") from None
    if data_path is not None and cfg.data.name not in PATH_REQUIRED:
        log(f"note: --data-path is ignored: {cfg.data.name} is embedded in the package")
    dev = resolve_device(device or cfg.device)
    if cfg.cpu_threads and dev.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=dev, enabled=False)
    data = load_run_data(cfg, dev, need_train=False)
    info = ck.get("data_info") or data.info
    model = build_run_model(cfg, info).to(dev)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:  # missing / unexpected keys, size mismatches
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ckpt_lib.CheckpointError(f"{path}: the weights do not fit the model its stored config describes "
                                       f"({cfg.model.name}: {first})") from None
    model.eval()
    eps = cfg.eps if eps is None else float(eps)
    n = cfg.eval.test_n if n is None else n
    n = len(data.test) if n is None else min(int(n), len(data.test))
    bs = batch_size or cfg.eval.batch_size
    # the training run's labels (seed, method options as resolved, training eps) beside the evaluation's eps
    out: Dict[str, Any] = {"checkpoint": str(path), "epoch": ck.get("epoch"), "method": cfg.method.name,
                           "method_options": build_method(cfg.method.name, **cfg.method.options).resolved_options(),
                           "seed": cfg.seed, "model": cfg.model.name, "data": cfg.data.name, "train_eps": cfg.eps,
                           "eps": eps, "n": n, "results": {}}
    rows = []
    log(f"evaluating {path}: {', '.join(attacks)} on {n} test images")  # before the attacks: it has started
    for attack in attacks:
        t0 = time.perf_counter()
        if attack == "clean":
            acc, _ = evaluate_clean(model, data.test, bs, ctx, n=n)
            res: Dict[str, Any] = {"accuracy": acc}
            label = "clean"
        elif attack == "pgd":
            r = evaluate_robust(model, data.test, n, eps, pgd_steps, pgd_restarts, pgd_step_size, bs,
                                mix_seed(cfg.seed, Stream.TEST), ctx)
            res = {"accuracy": r["robust_acc"], "clean_acc": r["clean_acc"], "steps": pgd_steps,
                   "restarts": pgd_restarts, "step_size": pgd_step_size if pgd_step_size is not None else eps / 4}
            label = f"PGD-{pgd_steps}-{pgd_restarts}"
        else:
            label = f"AutoAttack ({aa_version})"
            try:
                version: Any = aa_version if aa_version in AA_VERSIONS else [a.strip() for a in aa_version.split(",")]
                r = autoattack_accuracy(model, data.test.x[:n], data.test.y[:n], eps, version=version,
                                        batch_size=bs, seed=cfg.seed, device=dev)
                res = {"accuracy": r["robust_acc"], "clean_acc": r["clean_acc"], "version": aa_version,
                       "per_attack": r["per_attack"], "warnings": r["warnings"]}
                for msg in r["warnings"]:
                    log(f"WARNING: AutoAttack's check: {msg}")
            except ImportError as exc:
                log(f"AutoAttack skipped: {exc}")
                res = {"accuracy": None, "skipped": str(exc)}
        res["time_s"] = time.perf_counter() - t0
        out["results"][attack] = res
        rows.append([label, n, "skipped" if res["accuracy"] is None else res["accuracy"], f"{res['time_s']:.1f}"])
    log(f"{path} (epoch {ck.get('epoch')}, {cfg.method.name} / {cfg.model.name} / {cfg.data.name}, eps {eps:.5g}):")
    log(format_table(rows, ["attack", "n", "accuracy", "time_s"]))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """The evaluate command; returns its exit status."""
    torch.set_grad_enabled(True)
    p = argparse.ArgumentParser(prog="bilevel-evaluate", description=help_text(__doc__.split("\n\n")[0]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=help_text(__doc__.split("\n\n", 1)[1]))
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint or a run directory")
    p.add_argument("--n", type=int, default=None, help="first N test images (default: eval.test_n of the run)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eps", type=str, default=None, help="attack radius, e.g. 8/255 (default: the run's)")
    p.add_argument("--attacks", type=str, default="clean,pgd", help=f"comma-separated subset of {','.join(ATTACKS)}")
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--pgd-restarts", type=int, default=10)
    p.add_argument("--pgd-step-size", type=str, default=None, help="default eps/4")
    p.add_argument("--aa-version", type=str, default="standard",
                   help="standard | plus | rand, or a comma list of attacks (apgd-ce,apgd-t: cheap, not RA-AA)")
    p.add_argument("--data-path", type=str, default=None, help="where the test data is (replaces the stored path)")
    p.add_argument("--device", type=str, default=None, help="auto | cpu | cuda (default: the run's)")
    p.add_argument("--output", type=Path, default=None, help="JSON output path")
    args = parse_args(p, argv)

    problems = []
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        problems.append(f"--attacks: unknown {bad}; choose from {', '.join(ATTACKS)}")
    eps = step = None
    if args.eps is not None:
        eps = as_float(args.eps)
        if eps is None or not 0 < eps <= 1:
            problems.append(f"--eps: expected a number in (0, 1] such as 8/255, got {args.eps!r}")
    if args.pgd_step_size is not None:
        step = as_float(args.pgd_step_size)
        if step is None or step <= 0:
            problems.append(f"--pgd-step-size: expected a positive number, got {args.pgd_step_size!r}")
    for name in ("n", "batch_size", "pgd_steps", "pgd_restarts"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            problems.append(f"--{name.replace('_', '-')}: must be positive, got {v}")
    if args.aa_version not in AA_VERSIONS:
        unknown = [a for a in (p.strip() for p in args.aa_version.split(",")) if a not in AA_ATTACKS]
        if unknown:
            problems.append(f"--aa-version: unknown attack {unknown[0]!r}; choose {' | '.join(AA_VERSIONS)} or a comma "
                            f"list of {', '.join(AA_ATTACKS)}")
    if args.output is not None:  # checked now, not after minutes of attacks
        parent = args.output.parent if str(args.output.parent) else Path(".")
        if not parent.is_dir():
            problems.append(f"--output: directory {parent} does not exist")
        elif not os.access(parent, os.W_OK):
            problems.append(f"--output: directory {parent} is not writable")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return EXIT_USAGE
    return run_command(lambda hint: _evaluate(args, attacks, eps, step),
                       ResumeHint("the evaluation stopped; nothing was written (the checkpoint is untouched)"))


def _evaluate(args: argparse.Namespace, attacks: List[str], eps: Optional[float], step: Optional[float]) -> int:
    out = evaluate_checkpoint(args.checkpoint, attacks, n=args.n, batch_size=args.batch_size, eps=eps,
                              data_path=args.data_path, device=args.device, pgd_steps=args.pgd_steps,
                              pgd_restarts=args.pgd_restarts, pgd_step_size=step, aa_version=args.aa_version,
                              log=lambda m: print(m, flush=True))
    ckpt = Path(out["checkpoint"])
    dest = args.output or ckpt.parent / f"eval_{ckpt.stem}.json"
    try:
        dest.write_text(json.dumps(out, indent=2))
    except OSError as exc:
        print(json.dumps(out, indent=2))
        print(f"error: cannot write {dest} ({exc}); the results are printed above", file=sys.stderr)
        return EXIT_USAGE
    print(f"written: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
