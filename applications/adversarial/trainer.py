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

import copy
import functools
import importlib.util
import itertools
import logging
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from applications.common import checkpoint as ckpt_lib
from applications.common.atomic import remove_stale_temporaries, write_json, write_metrics, write_text
from applications.common.checkpoint import RUN_KIND_KEY
from applications.common.errors import EXIT_DIVERGED
from applications.common.rundir import RunDirError, RunLock
from applications.vision.data import Augment, DeviceLoader

from . import distributed as dist_lib
from .attacks import ShardedGenerator
from .build import build_run_model, load_run_data
from .config import Config, ConfigError, config_to_dict
from .evaluation import autoattack_accuracy, evaluate_attack_gap, evaluate_clean, evaluate_robust, format_table
from .guard import (
    RUN_KIND,
    TrainingDiverged,
    check_config_file,
    divergence_reason,
    resumable_checkpoint,
    resume_changes,
)
from .methods import build_method
from .overfitting import CatastrophicOverfitting
from .records import METRIC_FIELDS, RUN_FILES, TENSORBOARD_DIR, TensorBoardScalars, write_plot
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

#: Version of the checkpoint layout written by :class:`Trainer`.
CHECKPOINT_FORMAT = 1

logger = logging.getLogger(__name__)


class ConsoleHandler(logging.Handler):
    """Writes log messages to stdout, above any tqdm progress bar (plain ``print`` without tqdm)."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the apps extra
            print(msg)
        else:
            tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


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
        """Runs ``action`` on rank 0; a RunDirError (or an OSError, as one) there is raised on every rank."""
        error = None
        if self.ctx.is_main:
            try:
                action()
            except RunDirError as exc:
                error = str(exc)
            except OSError as exc:
                error = f"cannot write to the run directory {self.run_dir}: {exc}"
        error = dist_lib.broadcast_object(error, self.ctx)  # every rank fails together
        if error:
            raise RunDirError(error)

    def _check_run_dir(self) -> None:
        """Before anything is loaded: the directory is this process's alone (:class:`RunLock`: a second run
        on it stops here, naming the first one's pid) and can hold this run. Nothing else is written."""
        assert self.lock is not None
        self.lock.acquire()
        if self.lock.took_over is not None:
            self.notes.append(f"took over the lock of process {self.lock.took_over}, which no longer runs")
        last, best = self.run_dir / "last.pt", self.run_dir / "best.pt"
        if self.resume:
            resumable_checkpoint(self.run_dir)
        elif (last.is_file() or best.is_file()) and not self.cfg.output.overwrite:
            if last.is_file():
                raise RunDirError(f"run directory {self.run_dir} already holds a checkpoint; resume it with "
                                  f"--resume {self.run_dir}, choose another output.name, or set output.overwrite=true")
            raise RunDirError(f"run directory {self.run_dir} holds best.pt but no last.pt (it cannot be resumed); "
                              "set output.overwrite=true to start it again, or choose another output.name")

    def _open_run_dir(self) -> None:
        """Once the run is ready to train (data loaded, model built, checkpoint accepted): clears an
        overwritten run, removes temporaries of killed writes, writes config.yaml."""
        if not self.resume and self.cfg.output.overwrite:
            for name in RUN_FILES:
                p = self.run_dir / name
                if p.exists():
                    p.unlink()
            for p in self.run_dir.glob("eval_*.json"):  # evaluations of the replaced checkpoints
                p.unlink()
            shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for p in remove_stale_temporaries(self.run_dir):
            self.notes.append(f"removed {p.name}, left by a write that was killed")
        write_text(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

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
        self._rewrite_best = False

    def _load_resume(self) -> None:
        path = self.run_dir / "last.pt"
        ck = ckpt_lib.load(path, map_location="cpu")
        ckpt_lib.check_run_kind(ck, RUN_KIND, path)
        stored = ck.get("config")
        if not isinstance(stored, dict):
            raise ckpt_lib.CheckpointError(f"{path} stores no config; it cannot be resumed")
        new = config_to_dict(self.cfg)
        check_config_file(self.run_dir, stored, new)
        change = resume_changes(stored, new, int(ck.get("epoch", 0)), self.run_dir)
        self.config_changes = [dict(c) for c in ck.get("config_changes", [])]
        if change["changes"]:
            self.config_changes.append(change)
            self.notes.append(f"resumed after epoch {change['after_epoch']} with a changed config (recorded in last.pt and "
                              "results.json): " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in
                                                            change["changes"].items()))
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != "last":
            raise ckpt_lib.CheckpointError(f"{path} is not a resumable last-checkpoint of this trainer")
        saved_info = ck.get("data_info") or {}
        diffs = [f"{k}: saved={saved_info[k]!r} new={self.data.info[k]!r}" for k in ("num_classes", "channels")
                 if k in saved_info and saved_info[k] != self.data.info[k]]
        if diffs:
            raise ckpt_lib.CheckpointError(f"checkpoint {path} is incompatible with the data of data.path="
                                           f"{self.cfg.data.path} ({'; '.join(diffs)}); resume with the run's data")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
        self.best_val_robust = float(ck["best_val_robust_acc"])
        self.best_epoch = ck.get("best_epoch")
        self.history = [dict(r) for r in ck.get("history", [])]
        self.wall_before = float(ck.get("wall_time_s", sum(r.get("epoch_time_s", 0.0) for r in self.history)))
        self.co_stop = bool(ck.get("co_stop", False)) and self.cfg.co.early_stop  # lifted by co.early_stop=false
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
            self.method_gen.manual_seed(mix_seed(self.cfg.seed, Stream.METHOD, 0, self.epoch))
        self.history = [r for r in self.history if r["epoch"] <= self.epoch]
        self._resumed_from = path
        self._reconcile_best(ck)

    def _reconcile_best(self, ck: Dict[str, Any]) -> None:
        """best.pt agrees with the resumed state. last.pt is written before best.pt, so a kill between
        the two leaves a best epoch that is the last epoch, whose weights are last.pt's: best.pt is written
        again from them. A best.pt of another epoch (older runs wrote best.pt first) is kept, and its own
        epoch and score become the best so far."""
        if self.best_epoch is None:
            return
        path = self.run_dir / "best.pt"
        best = ckpt_lib.load(path, map_location="cpu") if path.is_file() else None
        if best is not None and best.get("epoch") == self.best_epoch:
            return
        if self.best_epoch == self.epoch:
            self._rewrite_best = True
        elif best is not None:
            self.notes.append(f"best.pt holds epoch {best.get('epoch')}, not the recorded best epoch {self.best_epoch}: "
                              "kept as the best checkpoint")
            self.best_epoch = int(best["epoch"])
            self.best_val_robust = float(best.get("val_score", best.get("val_robust_acc") or 0.0))
        else:
            self.notes.append(f"best.pt (epoch {self.best_epoch}) is missing; the next best epoch writes it")
            self.best_epoch, self.best_val_robust = None, -1.0

    # ----------------------------------------------------------------------------------- checkpoints

    def _rng_states(self) -> List[Dict[str, Any]]:
        mine = {"global": ckpt_lib.capture_rng_state(), "method_gen": self.method_gen.get_state(),
                "method_gen_device": self.device.type}
        return dist_lib.all_gather_object(mine, self.ctx)

    def _save_last(self, rng: List[Dict[str, Any]]) -> None:
        ckpt_lib.save_atomic({
            "format": CHECKPOINT_FORMAT, "kind": "last", RUN_KIND_KEY: RUN_KIND, "config": config_to_dict(self.cfg),
            "data_info": self.data.info, "epoch": self.epoch, "step": self.step, "total_steps": self.total_steps,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best_val_robust_acc": self.best_val_robust, "best_epoch": self.best_epoch,
            "co": self.co.state_dict() if self.co is not None else None, "co_stop": self.co_stop,
            "history": self.history, "config_changes": self.config_changes, "rng": rng, "world_size": self.ctx.world_size,
            "wall_time_s": self.wall_before + time.perf_counter() - self.wall0,
        }, self.run_dir / "last.pt")

    def _save_best(self, record: Dict[str, Any]) -> None:
        ckpt_lib.save_atomic({
            "format": CHECKPOINT_FORMAT, "kind": "best", RUN_KIND_KEY: RUN_KIND, "config": config_to_dict(self.cfg),
            "data_info": self.data.info, "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "val_clean_acc": record["val_clean_acc"], "val_robust_acc": record["val_robust_acc"],
            "val_score": self.best_val_robust,
        }, self.run_dir / "best.pt")

    def _write_epoch(self, record: Dict[str, Any], rng: List[Dict[str, Any]]) -> None:
        """Rank 0: the epoch's metrics, plot, scalars, last.pt and (a best epoch) best.pt."""
        cfg = self.cfg
        write_metrics(self.run_dir, self.history, METRIC_FIELDS)
        write_plot(self.run_dir / "plot.png", self.history, f"{cfg.method.name} / {cfg.model.name} / "
                    f"{cfg.data.name}, eps {cfg.eps:.4g}")
        if self.scalars is not None:
            self.scalars.add(record)
        self._save_last(rng)  # first: a kill before best.pt is repaired from last.pt (_reconcile_best)
        if record["is_best"]:
            self._save_best(record)

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
        batches = _progress(itertools.islice(self.loader, n_steps), self.progress, total=n_steps,
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
        self._on_main(self._check_run_dir)
        self._setup()
        if self.resume:
            self._load_resume()
        self._on_main(self._open_run_dir)
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

    def _check_divergence(self, loss: float) -> None:
        """A finite blow-up (:func:`~.guard.divergence_reason`), before anything of the epoch is saved."""
        t = self.cfg.train
        reason = divergence_reason(loss, self.history, self.params, int(self.data.info["num_classes"]),
                                   t.divergence_factor, t.max_weight)
        if reason is not None:
            last = self.run_dir / "last.pt"
            raise TrainingDiverged(self.epoch + 1, None, None, last if last.is_file() else None, reason=reason,
                                   run_dir=self.run_dir)

    def _run(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        if self.resume and ctx.is_main:  # metrics files follow the checkpoint (a crash may have left a newer line)
            write_metrics(self.run_dir, self.history, METRIC_FIELDS)
            if self._rewrite_best:
                self._save_best(self.history[-1])
        if self._resumed_from is not None:
            self.log(f"resumed from {self._resumed_from}: {self.epoch} epoch(s), {self.step} step(s) done")
        if cfg.output.tensorboard and ctx.is_main:  # a resumed run hides the events of the epochs it repeats
            self.scalars = TensorBoardScalars(self.run_dir / TENSORBOARD_DIR,
                                              purge_step=self.epoch + 1 if self.resume else None)
        for note in self.notes:
            self.log(f"note: {note}")
        self.log(f"run {self.run_dir}: {cfg.method.name} on {cfg.data.name} ({self.n_train} train / "
                 f"{len(self.data.val) if self.data.val is not None else 0} val / {len(self.data.test)} test), "
                 f"model {cfg.model.name}, eps {cfg.eps:.5g}, {self.spe} steps/epoch, {self.total_steps} steps, "
                 f"device {self.device}, {ctx.world_size} process(es)")
        idle = self._nothing_to_train()
        if idle is not None:
            self.log(f"nothing to train: {idle}")
        train_time = sum(r.get("epoch_time_s", 0.0) for r in self.history)
        epochs = _progress(range(self.epoch, cfg.train.epochs), self.progress, desc="epochs", unit="epoch",
                           initial=self.epoch, total=cfg.train.epochs)
        for _ in epochs:
            if self._nothing_to_train() is not None:
                break
            t0 = time.perf_counter()
            stats = self._train_epoch()
            self._check_divergence(stats["train_loss"])
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
            self._on_main(functools.partial(self._write_epoch, record, rng))
            vc, vr = record["val_clean_acc"], record["val_robust_acc"]
            self.log(f"epoch {self.epoch:3d}/{cfg.train.epochs}  step {self.step:6d}  lr {stats['lr']:.4f}  "
                     f"train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f}  "
                     f"val clean {'-' if vc is None else f'{vc:.4f}'} robust {'-' if vr is None else f'{vr:.4f}'}  "
                     f"({t1 - t0:.1f}s + eval {t2 - t1:.1f}s){'  *best' if record['is_best'] else ''}")
        if hasattr(epochs, "close"):
            epochs.close()
        return self._final(train_time, self.wall_before + time.perf_counter() - self.wall0)

    def _autoattack(self, model: nn.Module, entry: Dict[str, Any]) -> None:
        """Standard AutoAttack on the first ``eval.autoattack_n`` test images, in the main process only
        (the other ranks wait at the closing barrier: keep ``n`` within the process group's timeout),
        recorded in ``entry`` and printed. An error is logged and recorded, not raised: the PGD results
        are already saved."""
        cfg = self.cfg
        n = min(int(cfg.eval.autoattack_n), len(self.data.test))
        t0 = time.perf_counter()
        try:
            r = autoattack_accuracy(model, self.data.test.x[:n], self.data.test.y[:n], cfg.eps,
                                    batch_size=cfg.eval.batch_size, seed=cfg.seed)
        except Exception as exc:  # noqa: BLE001 - the run's results must survive a failed extra evaluation
            entry["autoattack_error"] = f"{type(exc).__name__}: {exc}"[:500]
            self.log(f"WARNING: AutoAttack failed ({entry['autoattack_error']}); the PGD results are saved")
            return
        entry.update({"autoattack_acc": r["robust_acc"], "autoattack_n": r["n"],
                      "autoattack_time_s": time.perf_counter() - t0})
        self.log(f"test (standard AutoAttack, eps {cfg.eps:.5g}): best checkpoint, first {r['n']} test images: "
                 f"robust_acc {r['robust_acc']:.4f} (clean {r['clean_acc']:.4f})")

    def _final(self, train_time: float, wall: float) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        test: Dict[str, Any] = {}
        best_model: Optional[nn.Module] = None
        attack = (f"PGD-{cfg.eval.test_steps}-{cfg.eval.test_restarts}, step "
                  f"{'eps/4' if cfg.eval.test_step_size is None else cfg.eval.test_step_size}")
        if cfg.eval.final_test:
            models: List[Tuple[str, nn.Module, Optional[int]]] = []
            best_path = self.run_dir / "best.pt"
            dist_lib.barrier(ctx)
            if self.best_epoch is not None and best_path.is_file():
                best = ckpt_lib.load(best_path, map_location=self.device)
                best_model = copy.deepcopy(self.model)
                best_model.load_state_dict(best["model"])
                models.append(("best", best_model, int(best["epoch"])))  # the file's own epoch
            models.append(("last", self.model, self.epoch))
            for name, model, epoch in models:
                if name == "last" and "best" in test and test["best"]["epoch"] == epoch:
                    # the best checkpoint is the last epoch: same weights, same seeded attack, same numbers
                    test[name] = {**test["best"], "time_s": 0.0}
                    continue
                t0 = time.perf_counter()
                r = evaluate_robust(model, self.data.test, cfg.eval.test_n, cfg.eps, cfg.eval.test_steps,
                                    cfg.eval.test_restarts, cfg.eval.test_step_size, cfg.eval.batch_size,
                                    mix_seed(cfg.seed, Stream.TEST), ctx)
                test[name] = {"epoch": epoch, **r, "time_s": time.perf_counter() - t0}
            rows = [[k, v["epoch"], v["n"], v["clean_acc"], v["robust_acc"]] for k, v in test.items()]
            self.log(f"test ({attack}, eps {cfg.eps:.5g}):\n" + format_table(
                rows, ["checkpoint", "epoch", "n", "clean_acc", "robust_acc"]))
        results = {
            "run_dir": str(self.run_dir), "method": cfg.method.name, "model": cfg.model.name, "data": cfg.data.name,
            "eps": cfg.eps, "epochs_completed": self.epoch, "steps": self.step, "world_size": ctx.world_size,
            "best_epoch": test["best"]["epoch"] if "best" in test else self.best_epoch,
            "best_val_robust_acc": self.best_val_robust if self.best_epoch else None,
            "test_attack": attack, "test": test,
            "catastrophic_overfitting": (None if self.co is None else
                                         {"detected": self.co.detected, "epoch": self.co.epoch,
                                          "message": self.co.message()}),
            "stopped_early": self.co_stop, "config_changes": self.config_changes, "train_time_s": train_time,
            "wall_time_s": wall,
        }
        if ctx.is_main:
            write_json(self.run_dir / "results.json", results)
            if cfg.eval.autoattack_runs:
                if "best" in test and best_model is not None:
                    self._autoattack(best_model, test["best"])
                    write_json(self.run_dir / "results.json", results)
                else:
                    self.log("note: eval.autoattack_n: no best checkpoint (no validation score), AutoAttack skipped")
        dist_lib.barrier(ctx)  # leave together: a rank tearing down gloo while another still talks aborts it
        return results


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
