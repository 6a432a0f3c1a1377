r"""The adversarial-training loop: per-iteration LR, validation, checkpoints, resume, CO detection.

Each optimizer step solves the upper problem of the method's bi-level program once:

.. math::

    \theta \leftarrow \theta - \mathrm{lr}_s \big(\nabla_\theta\, \mathrm{CE}(h_\theta(x + \delta^\star(\theta)), y)
    + \text{momentum, weight decay}\big),

where ``method.loss(model, x, y)`` builds :math:`\delta^\star(\theta)` (with whatever derivative the
method keeps, e.g. Fast-BAT's implicit term) and ``loss.backward()`` yields the full gradient. Batches
come from a :class:`~applications.vision.data.DeviceLoader` over the uint8 training split held on
the device; losses and accuracies stay in device tensors and are read once per epoch (the non-finite
check reads one scalar every ``train.nan_check_every`` steps).

Reproducibility: every random stream derives from ``seed`` (:mod:`~applications.adversarial.seeds`):
the initialization, the order and augmentation of epoch ``e`` (so epoch ``e`` is the same whether or not
the run was resumed), the methods' random starts (a generator whose state is checkpointed) and the
evaluation attacks (re-seeded for every evaluation). On the CPU a resumed run reproduces an
uninterrupted one bit for bit.

Data parallelism (``torchrun --nproc_per_node W``): ``train.batch_size`` is the GLOBAL batch; every rank
draws the same permutation and augmentation and takes its strided rows. The step calls
``method.loss(ddp_model, x, y, attack_model=module)`` (why: :mod:`~applications.adversarial.methods`).
DDP does not sync buffers in forward (``wrap_model(sync_buffers=False)``), so each rank keeps its own BatchNorm running statistics
during the epoch; they are averaged over ranks after every epoch. Only rank 0 writes files.

The log goes through :mod:`logging` (logger ``applications.adversarial.trainer``); during :meth:`Trainer.run`
rank 0 also appends it to the run's ``train.log``.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from applications.common import checkpoint as ckpt_lib
from applications.common.atomic import write_metrics
from applications.common.errors import EXIT_DIVERGED
from applications.common.rundir import RunDirError, RunLock
from applications.vision.data import Augment, DeviceLoader

from . import distributed as dist_lib
from .attacks import ShardedGenerator
from .build import build_run_model, load_run_data
from .config import Config, ConfigError
from .console import ConsoleHandler, progress
from .evaluation import evaluate_attack_gap, evaluate_clean, evaluate_robust
from .final import final_evaluation
from .guard import (
    CHECKPOINT_FORMAT,
    TrainingDiverged,
    check_divergence,
    check_run_dir,
    first_bad_step,
    load_resume,
    open_run_dir,
    raise_diverged,
    resumable_checkpoint,
    save_best,
    write_epoch,
)
from .methods import build_method
from .overfitting import CatastrophicOverfitting
from .records import METRIC_FIELDS, TENSORBOARD_DIR, TensorBoardScalars
from .schedule import learning_rate
from .seeds import Stream, mix_seed

__all__ = [
    "CHECKPOINT_FORMAT",
    "EXIT_DIVERGED",
    "ConsoleHandler",
    "RunDirError",
    "Trainer",
    "TrainingDiverged",
    "resumable_checkpoint",
    "train",
]

logger = logging.getLogger(__name__)


class Trainer:
    """One training run. ``run()`` trains (or resumes), validates every epoch, keeps ``best.pt`` (by
    validation robust accuracy) and ``last.pt`` (everything needed to resume), and finishes with a
    test evaluation of both written to ``results.json``.

    Files in the run directory (rank 0 only): config.yaml, train.log, metrics.jsonl, metrics.csv,
    plot.png, best.pt, last.pt, results.json.
    """

    def __init__(self, cfg: Config, ctx: dist_lib.DistContext, run_dir: Path, resume: bool = False,
                 progress: Optional[bool] = None) -> None:
        self.cfg, self.ctx, self.run_dir, self.resume = cfg, ctx, Path(run_dir), resume
        self.device = ctx.device
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
        # checked here, not in the config: a stored config that asks for it must still load for evaluation
        if cfg.eval.autoattack_n is not None and not cfg.eval.final_test:
            self.notes.append(f"eval.autoattack_n={cfg.eval.autoattack_n} not run: AutoAttack attacks the final test's "
                              "best checkpoint, and eval.final_test=false")
        if cfg.eval.autoattack_runs and importlib.util.find_spec("pyautoattack") is None:
            raise ConfigError(['eval.autoattack_n: needs the pyautoattack package: pip install "bilevel[autoattack]"'])

    # ----------------------------------------------------------------------------------- logging

    def log(self, msg: str) -> None:
        """One line of the run's log (rank 0 only): :mod:`logging` at INFO, and ``train.log`` during :meth:`run`."""
        if self.ctx.is_main:
            logger.info(msg)

    # ----------------------------------------------------------------------------------- setup

    def _on_main(self, action: Any) -> None:
        """Runs ``action`` on rank 0 (an OSError there as a RunDirError naming the run directory); if it fails,
        rank 0 raises the error and the other ranks :class:`~applications.common.distributed.StoppedElsewhere`
        (:func:`~applications.common.distributed.on_main`): every rank stops, one reports."""

        def guarded() -> None:
            try:
                action()
            except OSError as exc:
                raise RunDirError(f"cannot write to the run directory {self.run_dir}: {exc}") from None

        dist_lib.on_main(self.ctx, guarded)

    def _setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)  # noqa: NPY002  (legacy global state, for third-party code)
        torch.manual_seed(cfg.seed)
        # every rank reads the data; if one cannot (a node without the files), all stop and rank 0 says which
        self.data = dist_lib.agree(ctx, lambda: load_run_data(cfg, self.device))
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
        self.train_model: nn.Module = dist_lib.wrap_model(self.model, ctx, sync_buffers=False)
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
        self.method_gen.manual_seed(mix_seed(cfg.seed, Stream.METHOD, 0))
        a = cfg.data.augmentation
        augment = Augment(crop_padding=a.crop, flip=a.flip, rotation=a.rotation) if (
            a.crop > 0 or a.flip or a.rotation > 0) else None
        self.loader = DeviceLoader(self.data.train, cfg.train.batch_size, device=self.device, drop_last=True,
                                   augment=augment, generator=torch.Generator(device=self.device),
                                   channels_last=cfg.train.channels_last, rank=ctx.rank, world_size=ctx.world_size)
        self.co = CatastrophicOverfitting(**cfg.co.options) if cfg.co.enabled else None

        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.best_val_robust = -1.0
        self.best_epoch: Optional[int] = None
        self.history: List[Dict[str, Any]] = []
        self.co_stop = False
        self.wall_before = 0.0  # wall time of the processes before this one (resumed runs)
        self._resumed_from: Optional[Path] = None
        self.config_changes: List[Dict[str, Any]] = []  # the resumes that changed the config
        self.resumed_config: Dict[str, Any] = {}  # the config stored in the resumed last.pt
        self._rewrite_best = False

    # ----------------------------------------------------------------------------------- checkpoints

    def _rng_states(self) -> List[Dict[str, Any]]:
        mine = {"global": ckpt_lib.capture_rng_state(), "method_gen": self.method_gen.get_state(),
                "method_gen_device": self.device.type}
        return dist_lib.all_gather_object(mine, self.ctx)

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

    def _train_epoch(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        self.loader.generator.manual_seed(mix_seed(cfg.seed, Stream.DATA, self.epoch))
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
        batches = progress(itertools.islice(self.loader, n_steps), self.progress, total=n_steps,
                            desc=f"epoch {self.epoch + 1}", leave=False, unit="batch")
        for x, y in batches:
            lr = learning_rate(self.step, cfg.train, self.spe, self.total_steps)
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
                bad = first_bad_step(self, bad_step)
                if bad >= 0:
                    raise_diverged(self, bad, start_step)
        bad = first_bad_step(self, bad_step)
        if bad >= 0:
            raise_diverged(self, bad, start_step)
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
                                cfg.eval.val_step_size, cfg.eval.batch_size, mix_seed(cfg.seed, Stream.VAL), self.ctx)
            out.update(val_robust_acc=r["robust_acc"], val_robust_n=r["n"])
            if self.co is not None and float(getattr(self.method, "eps", 0.0) or 0.0) > 0:
                gap = evaluate_attack_gap(self.model, self.method, self.data.train, cfg.eval.val_n, cfg.eps,
                                          cfg.eval.val_steps, cfg.eval.val_restarts, cfg.eval.val_step_size,
                                          cfg.eval.batch_size, mix_seed(cfg.seed, Stream.CHECK, self.epoch), self.ctx)
                out.update(train_attack_acc=gap["attack_acc"], train_pgd_acc=gap["pgd_acc"])
        return out

    # ----------------------------------------------------------------------------------- run

    def run(self) -> Dict[str, Any]:
        """Trains to the end (or resumes and finishes), then evaluates; returns the results dict.

        Nothing is written before the data is loaded, the model built and the checkpoint to resume
        accepted; only then is an overwritten run cleared and config.yaml written."""
        self.wall0 = time.perf_counter()
        self.lock = RunLock(self.run_dir) if self.ctx.is_main else None
        try:
            return self._locked_run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _locked_run(self) -> Dict[str, Any]:
        self._on_main(functools.partial(check_run_dir, self))
        self._setup()
        if self.resume:
            load_resume(self)
        self._on_main(functools.partial(open_run_dir, self))
        handler: Optional[logging.Handler] = None
        if self.ctx.is_main:  # train.log: this run's messages, appended
            handler = logging.FileHandler(self.run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        self.scalars: Optional[TensorBoardScalars] = None
        try:
            return self._run()
        finally:
            if self.scalars is not None:
                self.scalars.close()
            if handler is not None:
                logger.removeHandler(handler)
                handler.close()

    def _nothing_to_train(self) -> Optional[str]:
        """Why the loop will not train another epoch, or None."""
        cfg = self.cfg
        if self.co_stop:
            where = f" (catastrophic overfitting at epoch {self.co.epoch})" if self.co is not None else ""
            return (f"the run was stopped by co.early_stop after epoch {self.epoch}{where}; resume with "
                    "co.early_stop=false to train on")
        if self.epoch >= cfg.train.epochs or self.step >= self.total_steps:
            return (f"{self.epoch} of train.epochs={cfg.train.epochs} epoch(s) and {self.step} of {self.total_steps} "
                    "step(s) are done; raise train.epochs (or train.max_steps) to extend the run")
        return None

    def _run(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        if self.resume and ctx.is_main:  # metrics files follow the checkpoint (a crash may have left a newer line)
            write_metrics(self.run_dir, self.history, METRIC_FIELDS)
            if self._rewrite_best:
                save_best(self, self.history[-1])
        if self._resumed_from is not None:
            self.log(f"resumed from {self._resumed_from}: {self.epoch} epoch(s), {self.step} step(s) done")
        if cfg.output.tensorboard and ctx.is_main:  # a resumed run hides the events of the epochs it repeats
            self.scalars = TensorBoardScalars(self.run_dir / TENSORBOARD_DIR,
                                              purge_step=self.epoch + 1 if self.resume else None)
        for note in self.notes:
            self.log(f"note: {note}")
        options = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in self.method.resolved_options().items())
        self.log(f"run {self.run_dir}: {cfg.method.name} ({options}), seed {cfg.seed}, on {cfg.data.name} "
                 f"({self.n_train} train / "
                 f"{len(self.data.val) if self.data.val is not None else 0} val / {len(self.data.test)} test), "
                 f"model {cfg.model.name}, eps {cfg.eps:.5g}, {self.spe} steps/epoch, {self.total_steps} steps, "
                 f"device {self.device}, {ctx.world_size} process(es)")
        idle = self._nothing_to_train()
        if idle is not None:
            unsaved = self.resume and self.config_changes and self.config_changes[-1]["after_epoch"] == self.epoch
            self.log(f"nothing to train: {idle}" + ("; no epoch ran under the changed config, so last.pt keeps the "
                                                     "previous one: pass the changes again with the next --resume"
                                                     if unsaved else ""))
        train_time = sum(r.get("epoch_time_s", 0.0) for r in self.history)
        epochs = progress(range(self.epoch, cfg.train.epochs), self.progress, desc="epochs", unit="epoch",
                           initial=self.epoch, total=cfg.train.epochs)
        for _ in epochs:
            if self._nothing_to_train() is not None:
                break
            t0 = time.perf_counter()
            stats = self._train_epoch()
            check_divergence(self, stats["train_loss"])
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
                fired = self.co.update(self.epoch, val["val_clean_acc"], val["val_robust_acc"],
                                       attack_acc=val.get("train_attack_acc"), attack_pgd_acc=val.get("train_pgd_acc"))
                record["co_collapsed"] = bool(fired)
                if fired and self.co.detected_at == self.epoch:
                    for earlier in self.history:  # the streak from the onset on (patience > 1)
                        if earlier["epoch"] >= self.co.epoch:
                            earlier["co_collapsed"] = True
                    self.log(f"WARNING: {self.co.message()}")
                    if cfg.co.early_stop:
                        self.co_stop = True
                        self.log("co.early_stop: stopping training")
            self.history.append(record)
            rng = self._rng_states()
            self._on_main(functools.partial(write_epoch, self, record, rng))
            vc, vr = record["val_clean_acc"], record["val_robust_acc"]
            self.log(f"epoch {self.epoch:3d}/{cfg.train.epochs}  step {self.step:6d}  lr {stats['lr']:.4f}  "
                     f"train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f}  "
                     f"val clean {'-' if vc is None else f'{vc:.4f}'} robust {'-' if vr is None else f'{vr:.4f}'}  "
                     f"({t1 - t0:.1f}s + eval {t2 - t1:.1f}s){'  *best' if record['is_best'] else ''}")
        if hasattr(epochs, "close"):
            epochs.close()
        return final_evaluation(self, train_time, self.wall_before + time.perf_counter() - self.wall0)



def train(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False,
          progress: Optional[bool] = None) -> Dict[str, Any]:
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
        return Trainer(cfg, ctx, Path(run_dir), resume=resume, progress=progress).run()
    finally:
        dist_lib.cleanup(ctx)
