r"""The adversarial-training loop: data on the device, per-iteration LR, validation, checkpoints, metrics.

Each optimizer step solves the upper problem of the method's bi-level program once:

.. math::

    \theta \leftarrow \theta - \mathrm{lr}_s \big(\nabla_\theta\, \mathrm{CE}(h_\theta(x + \delta^\star(\theta)), y)
    + \text{momentum, weight decay}\big),

where ``method.loss(model, x, y)`` builds :math:`\delta^\star(\theta)` (with whatever derivative the
method keeps, e.g. Fast-BAT's implicit term) and ``loss.backward()`` yields the full gradient.

Design (airbench-style): the uint8 dataset lives on the device; a batch is one ``index_select``,
a ``/255`` and a batched augmentation; losses and accuracies are accumulated in device tensors and
read once per epoch (the non-finite check reads one scalar every ``train.nan_check_every`` steps).

Reproducibility. All randomness derives from ``seed``: the model initialization (global generator
seeded with ``seed``), the data order and augmentation of epoch ``e`` (a generator seeded from
``(seed, e)``, so epoch ``e`` is the same whether or not the run was resumed), the method's random
starts (a dedicated generator whose state is checkpointed), and the evaluation attacks (generators
re-seeded for every evaluation, so epochs are compared on the same random starts). On the CPU a
resumed run reproduces an uninterrupted one bit for bit.

Data parallelism (``torchrun --nproc_per_node W``). ``train.batch_size`` is the GLOBAL batch: every
rank draws the same permutation and the same augmentation of global batch ``j`` and takes the
strided part ``[rank::W]`` (``batch_size`` must be divisible by ``W``). The module is wrapped in
``DistributedDataParallel`` and the step calls ``method.loss(ddp_model, x, y, attack_model=module)``:
every attack pass, input-gradient pass and Fast-BAT linearization runs through the plain module
(per-rank work with no collective), only the training forward at ``x + delta`` through the wrapper.
``loss.backward()`` sums the direct and the implicit (through ``delta(theta)``) contributions in each
parameter's ``.grad`` before DDP's hook all-reduces and averages it: the gradient of the global-batch
mean loss (``distributed.py``; checked in ``tests/adversarial/test_distributed.py``). DDP is built with
``broadcast_buffers=False``: each rank keeps its own BatchNorm running statistics during the epoch
(the attack passes never go through the wrapper, so broadcasting rank 0's buffers at the training
forward would only overwrite the other ranks' updates and cost one collective per step); they are
averaged over ranks after every epoch. The methods' random starts use one generator seeded alike on
every rank, through :class:`~applications.adversarial.methods.ShardedGenerator`: each rank takes its
rows of the draw for the global batch, so a BatchNorm-free model follows the single-process run with
the same global batch up to float reordering. With BatchNorm, batch statistics are per rank.
Evaluation and its attacks use the plain module. Only rank 0 writes files; metrics are reduced over ranks.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .attacks import _as_images, _EvalMode, robust_accuracy
from .config import Config, ConfigError, config_to_dict
from .data import Augment, ImageArrays, load_dataset, train_val_split
from .methods import ShardedGenerator, build_method
from .models import build_model
from .overfitting import CatastrophicOverfitting

__all__ = [
    "EXIT_CONFIG",
    "EXIT_DIVERGED",
    "CHECKPOINT_FORMAT",
    "RunDirError",
    "RunData",
    "TrainingDiverged",
    "Trainer",
    "build_run_model",
    "evaluate_clean",
    "evaluate_robust",
    "format_table",
    "learning_rate",
    "load_run_data",
    "mix_seed",
    "train",
]

EXIT_CONFIG = 2
EXIT_DIVERGED = 3
CHECKPOINT_FORMAT = 1
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_clean_acc", "val_robust_acc", "val_robust_n",
                 "epoch_time_s", "eval_time_s", "co_collapsed", "is_best")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/Inf at ``epoch`` (1-based), step ``step_in_epoch`` (1-based) of
    that epoch, global optimizer step ``step`` (1-based). ``last_good`` is the checkpoint left intact."""

    def __init__(self, epoch: int, step_in_epoch: int, step: int, last_good: Optional[Path]) -> None:
        self.epoch, self.step_in_epoch, self.step, self.last_good = epoch, step_in_epoch, step, last_good
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint yet (diverged in the first epoch)"
        super().__init__(f"training diverged: non-finite loss at epoch {epoch}, step {step_in_epoch} "
                         f"(global step {step}); stopped without saving; {where}. Lower train.lr_max or check the data.")


class RunDirError(RuntimeError):
    """The run directory cannot be used (holds a checkpoint of another run, or lacks one to resume)."""


def mix_seed(seed: int, *tags: int) -> int:
    """A deterministic 62-bit seed derived from ``seed`` and integer ``tags`` (splitmix64-style)."""
    h = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    for t in tags:
        h ^= (int(t) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 2


_TAG_DATA, _TAG_METHOD, _TAG_VAL, _TAG_TEST = 1, 2, 3, 4


def learning_rate(step: int, cfg: Config, steps_per_epoch: int, total_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``.

    cyclic: piecewise linear in ``t = (step + 1) / total_steps``: 0 at t = 0, ``lr_max`` at
    ``t = lr_peak``, 0 at t = 1 (the official schedule, evaluated after each iteration);
    piecewise: ``lr_max * lr_gamma ** #{m in lr_milestones : epoch >= m}`` with ``epoch = step //
    steps_per_epoch`` (0-based); constant: ``lr_max``.
    """
    t = cfg.train
    if t.lr_schedule == "cyclic":
        return float(np.interp((step + 1) / total_steps, [0.0, t.lr_peak, 1.0], [0.0, t.lr_max, 0.0]))
    if t.lr_schedule == "piecewise":
        epoch = step // steps_per_epoch
        return t.lr_max * t.lr_gamma ** sum(1 for m in t.lr_milestones if epoch >= m)
    return t.lr_max


# -------------------------------------------------------------------------------------------- data / model


@dataclass
class RunData:
    """Train / validation / test splits (uint8, on the device) and what the model needs to know."""

    train: ImageArrays
    val: Optional[ImageArrays]
    test: ImageArrays
    info: Dict[str, Any]


def load_run_data(cfg: Config, device: torch.device, need_train: bool = True) -> RunData:
    """Loads ``cfg.data``: the training split minus its last ``n_val`` images (validation), capped at
    ``n_train``, and the test split, all moved to ``device``."""
    train_full, test = load_dataset(cfg.data.name, cfg.data.path)
    info = {"num_classes": train_full.num_classes, "channels": train_full.channels,
            "image_size": list(train_full.image_size), "mean": list(train_full.mean), "std": list(train_full.std),
            "classes": list(train_full.classes)}
    val = None
    train_split = train_full
    if need_train:
        if cfg.data.n_val > 0:
            train_split, val = train_val_split(train_full, cfg.data.n_val)
        if cfg.data.n_train is not None:
            train_split = train_split.subset(slice(0, min(cfg.data.n_train, len(train_split))))
        train_split = train_split.to(device)
        val = val.to(device) if val is not None else None
    return RunData(train=train_split, val=val, test=test.to(device), info=info)


def build_run_model(cfg: Config, info: Dict[str, Any]) -> nn.Module:
    """The configured network with its input normalization (``models.build_model``)."""
    return build_model(cfg.model.name, int(info["num_classes"]), int(info["channels"]), info["mean"], info["std"],
                       **cfg.model.options)


# -------------------------------------------------------------------------------------------- evaluation


def _shard_range(n: int, ctx: dist_lib.DistContext) -> Tensor:
    return torch.arange(n)[ctx.rank::ctx.world_size] if ctx.enabled else torch.arange(n)


def evaluate_clean(model: nn.Module, arrays: ImageArrays, batch_size: int, ctx: dist_lib.DistContext,
                   n: Optional[int] = None) -> Tuple[float, int]:
    """Clean accuracy of ``model`` (eval mode) on the first ``n`` images, sharded over ranks.
    Returns (accuracy, number of images). One host synchronization."""
    n = len(arrays) if n is None else min(n, len(arrays))
    idx = _shard_range(n, ctx).to(arrays.x.device)
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with _EvalMode(model), torch.no_grad():  # restores each submodule's own mode
        for start in range(0, len(idx), batch_size):
            sel = idx[start:start + batch_size]
            x = _as_images(arrays.x.index_select(0, sel), device)
            y = arrays.y.index_select(0, sel).to(device)
            correct += (model(x).argmax(1) == y).sum()
    correct = dist_lib.reduce_sum(correct, ctx)
    return int(correct) / max(n, 1), n


def evaluate_robust(model: nn.Module, arrays: ImageArrays, n: Optional[int], eps: float, steps: int, restarts: int,
                    step_size: Optional[float], batch_size: int, seed: int, ctx: dist_lib.DistContext
                    ) -> Dict[str, float]:
    """Clean and PGD-``steps``-``restarts`` accuracy on the first ``n`` images (``attacks.robust_accuracy``),
    sharded over ranks; the random starts come from a generator seeded with ``seed`` (per rank)."""
    n = len(arrays) if n is None else min(n, len(arrays))
    idx = _shard_range(n, ctx).to(arrays.x.device)
    device = next(model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64)
    if len(idx) > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(mix_seed(seed, ctx.rank))
        res = robust_accuracy(model, arrays.x.index_select(0, idx), arrays.y.index_select(0, idx), eps, steps=steps,
                              restarts=restarts, step_size=step_size, batch_size=batch_size, device=device,
                              generator=gen)
        counts = torch.tensor([round(res["clean_acc"] * res["n"]), round(res["robust_acc"] * res["n"])],
                              dtype=torch.float64)
    if ctx.enabled:
        counts = dist_lib.reduce_sum(counts.to(ctx.device), ctx).cpu()
    clean, robust = counts.tolist()
    return {"clean_acc": clean / max(n, 1), "robust_acc": robust / max(n, 1), "n": n}


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (left-aligned first column, right-aligned others)."""
    cells = [[str(h) for h in header]] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: List[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


# -------------------------------------------------------------------------------------------- outputs


def _write_metrics(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    """metrics.jsonl and metrics.csv rewritten from the history (atomic renames)."""
    tmp = run_dir / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, run_dir / "metrics.jsonl")
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(METRIC_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in history:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
    os.replace(tmp, run_dir / "metrics.csv")


def _write_plot(path: Path, history: List[Dict[str, Any]], title: str) -> None:
    """plot.png: training accuracy (on the method's training inputs), validation clean and robust
    accuracy per epoch; train loss on a second panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the apps extra
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(epochs, [r["train_acc"] for r in history], "o-", label="train (method's inputs)")
    if any(r.get("val_clean_acc") is not None for r in history):
        ax.plot(epochs, [r.get("val_clean_acc") for r in history], "s-", label="val clean")
        ax.plot(epochs, [r.get("val_robust_acc") for r in history], "^-", label="val robust (PGD)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    ax2.plot(epochs, [r["train_loss"] for r in history], "o-", color="C3")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("train loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(".plot.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


# -------------------------------------------------------------------------------------------- trainer


class Trainer:
    """One training run. ``run()`` trains (or resumes), validates every epoch, keeps ``best.pt`` (by
    validation robust accuracy) and ``last.pt`` (everything needed to resume), and finishes with a
    test evaluation of both written to ``results.json``.

    Files in the run directory (rank 0 only): config.yaml, train.log, metrics.jsonl, metrics.csv,
    plot.png, best.pt, last.pt, results.json.
    """

    def __init__(self, cfg: Config, ctx: dist_lib.DistContext, run_dir: Path, resume: bool = False,
                 log: Optional[Callable[[str], None]] = None, progress: Optional[bool] = None) -> None:
        self.cfg, self.ctx, self.run_dir, self.resume = cfg, ctx, Path(run_dir), resume
        self.device = ctx.device
        self._log_fn = log
        if progress is None:
            progress = sys.stderr.isatty()
        self.progress = bool(progress) and ctx.is_main
        self.notes: List[str] = []
        t = cfg.train
        self.amp = t.amp
        if self.amp != "none" and self.device.type != "cuda":
            self.notes.append(f"train.amp={self.amp} ignored on {self.device.type} (mixed precision is CUDA-only)")
            self.amp = "none"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        if t.batch_size % ctx.world_size != 0:
            raise ConfigError([f"train.batch_size={t.batch_size} (the global batch) must be divisible by the "
                               f"number of processes {ctx.world_size}"])

    # ----------------------------------------------------------------------------------- logging

    def log(self, msg: str) -> None:
        if not self.ctx.is_main:
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        elif self.progress:
            from tqdm import tqdm

            tqdm.write(msg)
        else:
            print(msg, flush=True)
        with open(self.run_dir / "train.log", "a") as f:
            f.write(msg + "\n")

    # ----------------------------------------------------------------------------------- setup

    def _prepare_run_dir(self) -> None:
        error = None
        if self.ctx.is_main:
            try:
                self._prepare_run_dir_main()
            except RunDirError as exc:
                error = str(exc)
        error = dist_lib.broadcast_object(error, self.ctx)  # every rank fails together
        if error:
            raise RunDirError(error)

    def _prepare_run_dir_main(self) -> None:
        last = self.run_dir / "last.pt"
        if self.resume:
            if not last.is_file():
                raise RunDirError(f"cannot resume: {last} does not exist")
        elif last.is_file() or (self.run_dir / "best.pt").is_file():
            if not self.cfg.output.overwrite:
                raise RunDirError(f"run directory {self.run_dir} already holds a checkpoint; resume it with "
                                  f"--resume {self.run_dir}, choose another output.name, or set output.overwrite=true")
            for name in ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "plot.png", "results.json", "train.log"):
                p = self.run_dir / name
                if p.exists():
                    p.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    def _setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)  # noqa: NPY002  (legacy global state, for third-party code)
        torch.manual_seed(cfg.seed)
        self.data = load_run_data(cfg, self.device)
        self.n_train = len(self.data.train)
        self.spe = self.n_train // cfg.train.batch_size  # the last incomplete batch is dropped
        if self.spe == 0:
            raise ConfigError([f"train.batch_size={cfg.train.batch_size} exceeds the {self.n_train} training images"])
        total = cfg.train.epochs * self.spe
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total

        torch.manual_seed(cfg.seed)  # identical initialization on every rank
        self.model = build_run_model(cfg, self.data.info).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # identical initialization anyway; DDP's constructor also broadcasts rank 0's parameters and buffers
        self.attack_model: nn.Module = self.model
        self.train_model: nn.Module = dist_lib.wrap_model(self.model, ctx, broadcast_buffers=False)
        if cfg.train.compile:
            self.attack_model = torch.compile(self.model)  # type: ignore[assignment]
            self.train_model = (torch.compile(self.train_model)  # type: ignore[assignment]
                                if ctx.enabled else self.attack_model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=0.0, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay, nesterov=cfg.train.nesterov)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.method = build_method(cfg.method.name, **cfg.method.options)
        self.method_gen = torch.Generator(device=self.device)  # the same on every rank (see _method_generator)
        self.method_gen.manual_seed(mix_seed(cfg.seed, _TAG_METHOD, 0))
        a = cfg.data.augmentation
        self.augment = Augment(crop_padding=a.crop, flip=a.flip, rotation=a.rotation) if (
            a.crop > 0 or a.flip or a.rotation > 0) else None
        self.co = CatastrophicOverfitting(**cfg.co.options) if cfg.co.enabled else None

        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.best_val_robust = -1.0
        self.best_epoch: Optional[int] = None
        self.history: List[Dict[str, Any]] = []
        self.co_stop = False

    def _load_resume(self) -> None:
        path = self.run_dir / "last.pt"
        ck = ckpt_lib.load(path, map_location="cpu")
        ckpt_lib.check_compatible(ck.get("config", {}), config_to_dict(self.cfg))
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != "last":
            raise ckpt_lib.CheckpointError(f"{path} is not a resumable last-checkpoint of this trainer")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
        self.best_val_robust = float(ck["best_val_robust_acc"])
        self.best_epoch = ck.get("best_epoch")
        self.history = [dict(r) for r in ck.get("history", [])]
        self.co_stop = bool(ck.get("co_stop", False))
        if self.co is not None and ck.get("co") is not None:
            self.co.load_state_dict(ck["co"])
        states = ck.get("rng") or []
        saved_world = int(ck.get("world_size", 1))
        if len(states) == self.ctx.world_size:
            mine = states[self.ctx.rank]
            ckpt_lib.restore_rng_state(mine["global"])
            gen_state = mine.get("method_gen")
            if gen_state is not None and mine.get("method_gen_device") == self.device.type:
                self.method_gen.set_state(gen_state)
            else:
                self.notes.append("method generator re-seeded (checkpoint from another device type)")
        else:
            self.notes.append(f"checkpoint written by {saved_world} process(es), resumed with {self.ctx.world_size}: "
                              "random generators re-seeded (the run will not be bit-identical)")
            self.method_gen.manual_seed(mix_seed(self.cfg.seed, _TAG_METHOD, 0, self.epoch))
        if self.ctx.is_main:  # metrics files follow the checkpoint (a crash may have left a newer line)
            self.history = [r for r in self.history if r["epoch"] <= self.epoch]
            _write_metrics(self.run_dir, self.history)
        self.log(f"resumed from {path}: {self.epoch} epoch(s), {self.step} step(s) done")

    # ----------------------------------------------------------------------------------- checkpoints

    def _rng_states(self) -> List[Dict[str, Any]]:
        mine = {"global": ckpt_lib.capture_rng_state(), "method_gen": self.method_gen.get_state(),
                "method_gen_device": self.device.type}
        return dist_lib.all_gather_object(mine, self.ctx)

    def _save_last(self, rng: List[Dict[str, Any]]) -> None:
        ckpt_lib.save_atomic({
            "format": CHECKPOINT_FORMAT, "kind": "last", "config": config_to_dict(self.cfg),
            "data_info": self.data.info, "epoch": self.epoch, "step": self.step, "total_steps": self.total_steps,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best_val_robust_acc": self.best_val_robust, "best_epoch": self.best_epoch,
            "co": self.co.state_dict() if self.co is not None else None, "co_stop": self.co_stop,
            "history": self.history, "rng": rng, "world_size": self.ctx.world_size,
        }, self.run_dir / "last.pt")

    def _save_best(self, record: Dict[str, Any]) -> None:
        ckpt_lib.save_atomic({
            "format": CHECKPOINT_FORMAT, "kind": "best", "config": config_to_dict(self.cfg),
            "data_info": self.data.info, "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "val_clean_acc": record["val_clean_acc"], "val_robust_acc": record["val_robust_acc"],
        }, self.run_dir / "best.pt")

    # ----------------------------------------------------------------------------------- one epoch

    def _method_generator(self) -> Any:
        """The methods' generator: itself on one process; under DDP its rank's rows of the global draw."""
        if not self.ctx.enabled:
            return self.method_gen
        return ShardedGenerator(self.method_gen, self.ctx.rank, self.ctx.world_size)

    def _average_buffers(self) -> None:
        """BatchNorm running statistics averaged over ranks (each rank saw a different shard)."""
        for b in self.model.buffers():
            if b.is_floating_point():
                b.copy_(dist_lib.reduce_mean(b, self.ctx))

    def _first_bad_step(self, bad_step: Tensor) -> int:
        """The first global step with a non-finite loss on any rank, or -1 (one host synchronization)."""
        big = torch.iinfo(torch.int64).max
        t = torch.where(bad_step < 0, torch.full_like(bad_step, big), bad_step)
        if self.ctx.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        v = int(t)
        return -1 if v == big else v

    def _raise_diverged(self, bad: int, epoch_start_step: int) -> None:
        last = self.run_dir / "last.pt"
        raise TrainingDiverged(self.epoch + 1, bad - epoch_start_step + 1, bad + 1, last if last.is_file() else None)

    def _train_epoch(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        B = cfg.train.batch_size
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(cfg.seed, _TAG_DATA, self.epoch))
        perm = torch.randperm(self.n_train, generator=gen, device=self.device)
        xs, ys = self.data.train.x, self.data.train.y
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        count = 0
        start_step = self.step
        n_steps = min(self.spe, self.total_steps - self.step)
        self.model.train()
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        lr = 0.0
        method_gen = self._method_generator()
        bar = _progress(range(n_steps), self.progress, desc=f"epoch {self.epoch + 1}", leave=False, unit="batch")
        for i in bar:
            idx = perm[i * B:(i + 1) * B]
            x = xs.index_select(0, idx).float().div_(255)
            y = ys.index_select(0, idx)
            if self.augment is not None:
                x = self.augment(x, gen)  # same draws on every rank: the global batch is augmented as one
            if ctx.enabled:
                x, y = x[ctx.rank::ctx.world_size], y[ctx.rank::ctx.world_size]
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = learning_rate(self.step, cfg, self.spe, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, logits = self.method.loss(self.train_model, x, y, generator=method_gen,
                                                attack_model=self.attack_model)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()  # under DDP the gradients are averaged over ranks inside backward
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            loss_d = loss.detach().float()
            loss_sum += loss_d * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(loss_d), self.step)
            count += len(y)
            self.step += 1
            if (self.step - start_step) % cfg.train.nan_check_every == 0:
                bad = self._first_bad_step(bad_step)
                if bad >= 0:
                    self._raise_diverged(bad, start_step)
        bad = self._first_bad_step(bad_step)
        if bad >= 0:
            self._raise_diverged(bad, start_step)
        totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(count), device=self.device,
                                                                                  dtype=torch.float64)])
        totals = dist_lib.reduce_sum(totals, ctx).tolist()
        if ctx.enabled:
            self._average_buffers()
        n = max(totals[2], 1.0)
        return {"train_loss": totals[0] / n, "train_acc": totals[1] / n, "lr": lr, "steps": n_steps}

    def _validate(self) -> Dict[str, Any]:
        cfg, val = self.cfg, self.data.val
        if val is None or len(val) == 0:
            return {"val_clean_acc": None, "val_robust_acc": None, "val_robust_n": 0}
        clean, _ = evaluate_clean(self.model, val, cfg.eval.batch_size, self.ctx)
        out: Dict[str, Any] = {"val_clean_acc": clean, "val_robust_acc": None, "val_robust_n": 0}
        if cfg.eval.val_n > 0:
            r = evaluate_robust(self.model, val, cfg.eval.val_n, cfg.eps, cfg.eval.val_steps, cfg.eval.val_restarts,
                                cfg.eval.val_step_size, cfg.eval.batch_size, mix_seed(cfg.seed, _TAG_VAL), self.ctx)
            out.update(val_robust_acc=r["robust_acc"], val_robust_n=r["n"])
        return out

    # ----------------------------------------------------------------------------------- run

    def run(self) -> Dict[str, Any]:
        """Trains to the end (or resumes and finishes), then evaluates; returns the results dict."""
        wall0 = time.perf_counter()
        cfg, ctx = self.cfg, self.ctx
        self._prepare_run_dir()
        self._setup()
        if self.resume:
            self._load_resume()
        for note in self.notes:
            self.log(f"note: {note}")
        self.log(f"run {self.run_dir}: {cfg.method.name} on {cfg.data.name} ({self.n_train} train / "
                 f"{len(self.data.val) if self.data.val is not None else 0} val / {len(self.data.test)} test), "
                 f"model {cfg.model.name}, eps {cfg.eps:.5g}, {self.spe} steps/epoch, {self.total_steps} steps, "
                 f"device {self.device}, {ctx.world_size} process(es)")
        train_time = sum(r.get("epoch_time_s", 0.0) for r in self.history)
        epochs = _progress(range(self.epoch, cfg.train.epochs), self.progress, desc="epochs", unit="epoch",
                           initial=self.epoch, total=cfg.train.epochs)
        for _ in epochs:
            if self.step >= self.total_steps or self.co_stop:
                break
            t0 = time.perf_counter()
            stats = self._train_epoch()
            t1 = time.perf_counter()
            val = self._validate()
            t2 = time.perf_counter()
            self.epoch += 1
            train_time += t1 - t0
            record: Dict[str, Any] = {"epoch": self.epoch, "step": self.step, "lr": stats["lr"],
                                      "train_loss": stats["train_loss"], "train_acc": stats["train_acc"], **val,
                                      "epoch_time_s": t1 - t0, "eval_time_s": t2 - t1, "co_collapsed": False,
                                      "is_best": False}
            score = val["val_robust_acc"] if val["val_robust_acc"] is not None else val["val_clean_acc"]
            if score is not None and score > self.best_val_robust:
                self.best_val_robust, self.best_epoch = float(score), self.epoch
                record["is_best"] = True
            if self.co is not None and val["val_robust_acc"] is not None:
                fired = self.co.update(self.epoch, val["val_clean_acc"], val["val_robust_acc"])
                record["co_collapsed"] = bool(fired)
                if fired and self.co.detected_at == self.epoch:
                    self.log(f"WARNING: {self.co.message()}")
                    if cfg.co.early_stop:
                        self.co_stop = True
                        self.log("co.early_stop: stopping training")
            self.history.append(record)
            rng = self._rng_states()
            if ctx.is_main:
                _write_metrics(self.run_dir, self.history)
                _write_plot(self.run_dir / "plot.png", self.history, f"{cfg.method.name} / {cfg.model.name} / "
                            f"{cfg.data.name}, eps {cfg.eps:.4g}")
                if record["is_best"]:
                    self._save_best(record)
                self._save_last(rng)
            dist_lib.barrier(ctx)
            vc, vr = record["val_clean_acc"], record["val_robust_acc"]
            self.log(f"epoch {self.epoch:3d}/{cfg.train.epochs}  step {self.step:6d}  lr {stats['lr']:.4f}  "
                     f"train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f}  "
                     f"val clean {'-' if vc is None else f'{vc:.4f}'} robust {'-' if vr is None else f'{vr:.4f}'}  "
                     f"({t1 - t0:.1f}s + eval {t2 - t1:.1f}s){'  *best' if record['is_best'] else ''}")
        if hasattr(epochs, "close"):
            epochs.close()
        return self._final(train_time, time.perf_counter() - wall0)

    def _final(self, train_time: float, wall: float) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        test: Dict[str, Any] = {}
        attack = (f"PGD-{cfg.eval.test_steps}-{cfg.eval.test_restarts}, step "
                  f"{'eps/4' if cfg.eval.test_step_size is None else cfg.eval.test_step_size}")
        if cfg.eval.final_test:
            models: List[Tuple[str, nn.Module, Optional[int]]] = []
            best_path = self.run_dir / "best.pt"
            dist_lib.barrier(ctx)
            if self.best_epoch is not None and best_path.is_file():
                best_model = copy.deepcopy(self.model)
                best_model.load_state_dict(ckpt_lib.load(best_path, map_location=self.device)["model"])
                models.append(("best", best_model, self.best_epoch))
            models.append(("last", self.model, self.epoch))
            for name, model, epoch in models:
                t0 = time.perf_counter()
                r = evaluate_robust(model, self.data.test, cfg.eval.test_n, cfg.eps, cfg.eval.test_steps,
                                    cfg.eval.test_restarts, cfg.eval.test_step_size, cfg.eval.batch_size,
                                    mix_seed(cfg.seed, _TAG_TEST), ctx)
                test[name] = {"epoch": epoch, **r, "time_s": time.perf_counter() - t0}
            rows = [[k, v["epoch"], v["n"], v["clean_acc"], v["robust_acc"]] for k, v in test.items()]
            self.log(f"test ({attack}, eps {cfg.eps:.5g}):\n" + format_table(
                rows, ["checkpoint", "epoch", "n", "clean_acc", "robust_acc"]))
        results = {
            "run_dir": str(self.run_dir), "method": cfg.method.name, "model": cfg.model.name, "data": cfg.data.name,
            "eps": cfg.eps, "epochs_completed": self.epoch, "steps": self.step, "world_size": ctx.world_size,
            "best_epoch": self.best_epoch, "best_val_robust_acc": self.best_val_robust if self.best_epoch else None,
            "test_attack": attack, "test": test,
            "catastrophic_overfitting": (None if self.co is None else
                                         {"detected": self.co.detected, "epoch": self.co.epoch,
                                          "message": self.co.message()}),
            "stopped_early": self.co_stop, "train_time_s": train_time, "wall_time_s": wall,
        }
        if ctx.is_main:
            tmp = self.run_dir / ".results.json.tmp"
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, self.run_dir / "results.json")
        dist_lib.barrier(ctx)  # leave together: a rank tearing down gloo while another still talks aborts it
        return results


def train(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False,
          log: Optional[Callable[[str], None]] = None, progress: Optional[bool] = None) -> Dict[str, Any]:
    """Runs (or, with ``resume=True``, continues) the training described by ``cfg`` in ``run_dir``
    (default ``output.dir/<run name>``). Joins the torchrun process group when launched by torchrun.

    Raises:
        TrainingDiverged: non-finite loss (nothing is saved for the failing epoch).
        RunDirError: the directory holds another run's checkpoint, or has none to resume.
        checkpoint.CheckpointError: the checkpoint to resume is from another model/problem or corrupt.
    """
    ctx = dist_lib.setup(cfg.device)
    if run_dir is None:
        run_dir = Path(cfg.output.dir) / cfg.run_name()
    try:
        return Trainer(cfg, ctx, Path(run_dir), resume=resume, log=log, progress=progress).run()
    finally:
        dist_lib.cleanup(ctx)
