"""Run configuration of the adversarial-training programs: YAML schema, overrides, validation.

A run is described by one YAML file (``yaml.safe_load``) with the sections below; every key has a
default, so a file only states what differs. ``key.sub=value`` overrides from the command line are
applied on top (values parsed with ``yaml.safe_load``; any float also accepts a fraction such as
``8/255``). :func:`load_config` validates everything before any work starts and raises ONE
:class:`ConfigError` that lists every problem (unknown keys with a did-you-mean suggestion, wrong
types, out-of-range values, unknown method/model/dataset names, a missing data path).

Sections::

    seed: 0                      # all randomness derives from it
    device: auto                 # auto | cpu | cuda | cuda:N
    cpu_threads: null            # torch.set_num_threads on the CPU (null: torch's default)
    data:    name, path, n_val, n_train, augmentation: {crop, flip, rotation}
    model:   name, options: {...}                  # options -> the model constructor
    method:  name, <that method's dataclass fields> (eps, step sizes, lam, ...)
    train:   epochs, batch_size, lr_max, lr_schedule (cyclic | piecewise | constant),
             lr_peak, lr_milestones, lr_gamma, momentum, weight_decay, nesterov,
             amp (bf16 | fp16 | none; CUDA only, bf16 recommended: with fp16 the GradScaler scales only
             the final backward, not the attack's input gradients), channels_last, compile, max_steps,
             nan_check_every
    eval:    every epoch: val clean accuracy + PGD(val_steps, val_restarts) on val_n images;
             at the end: PGD(test_steps, test_restarts, step eps/4) on test_n test images
    co:      catastrophic-overfitting detector options, enabled, early_stop
    output:  dir, name, overwrite

Learning-rate schedules (``s`` = optimizer steps taken, ``T`` = total steps, ``E`` = epochs):
``cyclic``: piecewise linear 0 -> lr_max at ``s = lr_peak * T`` -> 0 at ``s = T`` (stepped per
iteration, the paper's schedule with lr_peak = 0.5); ``piecewise``: lr_max, multiplied by lr_gamma
at each epoch in ``lr_milestones``; ``constant``: lr_max.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .data import DATASETS, PATH_MUST_EXIST, PATH_REQUIRED

__all__ = [
    "AugmentConfig",
    "COConfig",
    "Config",
    "ConfigError",
    "DATASETS",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainConfig",
    "CONFIG_DIR",
    "EXIT_CONFIG",
    "QUICKSTART",
    "apply_overrides",
    "as_float",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
]

#: Exit status of the commands on an invalid configuration (or an unusable run directory / checkpoint).
EXIT_CONFIG = 2
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"

class ConfigError(ValueError):
    """A configuration with one or more problems; ``problems`` lists each one."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"invalid configuration ({n} problem{'s' if n != 1 else ''}):\n{lines}")


# ----------------------------------------------------------------------------------------- schema


@dataclass
class AugmentConfig:
    """On-device training augmentation: random crop with ``crop`` pixels of zero padding (0: off),
    horizontal flip, random rotation by up to ``rotation`` degrees (0: off)."""

    crop: int = 0
    flip: bool = False
    rotation: float = 0.0


@dataclass
class DataConfig:
    """``name``: one of :data:`DATASETS`; ``path``: file/folder/download root (required for all but
    the embedded mnist5k and digits); ``n_val``: images held out of the training split for
    validation (the last ``n_val``, the paper's 45k/5k protocol); ``n_train``: optional cap on the
    remaining training images (a prefix)."""

    name: str = "mnist5k"
    path: Optional[str] = None
    n_val: int = 500
    n_train: Optional[int] = None
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """``name``: a name :func:`applications.adversarial.models.build_model` accepts; ``options``:
    keyword arguments of its constructor (``width``, ``hidden`` ... for small_cnn)."""

    name: str = "small_cnn"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """``name`` plus the options of that method (the fields of ``methods.METHODS[name]``)."""

    name: str = "fast_bat"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr_max: float = 0.2
    lr_schedule: str = "cyclic"
    lr_peak: float = 0.5
    lr_milestones: List[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    max_steps: Optional[int] = None
    nan_check_every: int = 50


@dataclass
class EvalConfig:
    """Per-epoch validation: clean accuracy on the whole validation split, PGD robust accuracy
    (``val_steps`` steps, ``val_restarts`` restarts, step ``val_step_size``, default eps/4 = 2.5 eps / 10)
    on the first ``val_n`` validation images. Final test: PGD-``test_steps``-``test_restarts`` with step
    ``test_step_size`` (default eps/4) on the first ``test_n`` test images (null: all) of the best
    and the last checkpoint. ``eps``: attack radius (default: the method's eps)."""

    eps: Optional[float] = None
    batch_size: int = 200
    val_n: int = 500
    val_steps: int = 10
    val_restarts: int = 1
    val_step_size: Optional[float] = None
    test_n: Optional[int] = 1000
    test_steps: int = 50
    test_restarts: int = 10
    test_step_size: Optional[float] = None
    final_test: bool = True


@dataclass
class COConfig:
    """Catastrophic-overfitting detection on the per-epoch validation numbers. ``options`` go to
    ``overfitting.CatastrophicOverfitting``; ``early_stop``: stop training when it is detected (the
    best checkpoint, from before the collapse, is kept either way)."""

    enabled: bool = True
    early_stop: bool = False
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputConfig:
    """Run directory ``dir/name`` (name default: ``<method>_<model>_<data>_seed<seed>``);
    ``overwrite``: allow starting a fresh run in a directory that already holds a checkpoint."""

    dir: str = "runs"
    name: Optional[str] = None
    overwrite: bool = False


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"
    cpu_threads: Optional[int] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    co: COConfig = field(default_factory=COConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def eps(self) -> float:
        """Attack radius used for evaluation: ``eval.eps`` or the method's eps."""
        if self.eval.eps is not None:
            return float(self.eval.eps)
        return float(self.method.options.get("eps", _method_default(self.method.name, "eps", 8 / 255)))

    def run_name(self) -> str:
        if self.output.name:
            return self.output.name
        return f"{self.method.name}_{self.model.name}_{self.data.name}_seed{self.seed}"

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)


# Sections whose free-form options are stored flat in YAML next to ``name`` (method) or nested
# under ``options`` (model, co).
_FLAT_OPTION_SECTIONS = {"method"}


# ------------------------------------------------------------------------------------ value types

_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*/\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


def as_float(value: Any) -> Optional[float]:
    """``value`` as a float (ints, floats, numeric strings, fractions such as "8/255"); None if not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            den = float(m.group(2))
            return float(m.group(1)) / den if den != 0 else None
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " | ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, collections.abc.Sequence):
        return "list"
    if origin in (dict, collections.abc.Mapping):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Tuple[bool, Any]:
    """Checks ``value`` against the type hint ``tp``; returns (ok, converted value).

    Understood: bool, int (not bool), float (ints and "a/b" fractions accepted), str, Optional,
    Union, Literal, list/tuple/Sequence of a type, dict. Anything else is accepted as is.
    """
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            return (type(None) in args), None
        for a in args:
            if a is type(None):
                continue
            ok, v = _coerce(value, a)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return (value in typing.get_args(tp)), value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            item_tp = Any
        out = []
        for item in value:
            ok, v = _coerce(item, item_tp)
            if not ok:
                return False, value
            out.append(v)
        return True, (tuple(out) if origin is tuple else out)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        f = as_float(value)
        return (f is not None), f
    if tp is str:
        return isinstance(value, str), value
    if value is None:
        return False, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _did_you_mean(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------ external registries


def _methods() -> Dict[str, type]:
    from . import methods

    return dict(methods.METHODS)


def _method_default(name: str, key: str, fallback: Any) -> Any:
    try:
        cls = _methods().get(name)
    except ImportError:
        return fallback
    if cls is None:
        return fallback
    for f in dataclasses.fields(cls):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    return fallback


def _safe_methods() -> Dict[str, type]:
    try:
        return _methods()
    except ImportError:  # pragma: no cover
        return {}


def _model_key(name: str) -> Optional[str]:
    from . import models

    key = name.strip().lower().replace("-", "_")
    key = models.MODEL_ALIASES.get(key, key)
    return key if key in models.MODELS else None


def _co_parameters() -> Optional[Dict[str, Any]]:
    """Keyword parameters of ``CatastrophicOverfitting.__init__`` (name -> annotation), or None if
    the module cannot be imported."""
    try:
        from .overfitting import CatastrophicOverfitting
    except ImportError:
        return None
    sig = inspect.signature(CatastrophicOverfitting.__init__)
    try:
        hints = typing.get_type_hints(CatastrophicOverfitting)
    except Exception:
        hints = {}
    return {
        n: hints.get(n, Any)
        for n, p in sig.parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


# --------------------------------------------------------------------------------- dict <-> Config


def _fill_dataclass(cls: type, raw: Any, where: str, problems: List[str]) -> Any:
    """Builds dataclass ``cls`` from the mapping ``raw``, recording problems instead of raising."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: Dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            problems.append(f"unknown key {path!r}{_did_you_mean(str(key), names)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _fill_dataclass(tp, value, path, problems)
            continue
        ok, v = _coerce(value, tp)
        if not ok:
            problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            continue
        kwargs[key] = v
    return cls(**kwargs)


def config_from_dict(raw: Any) -> Config:
    """Builds and validates a :class:`Config` from a nested mapping (the YAML document).

    Raises :class:`ConfigError` listing every problem found.
    """
    problems: List[str] = []
    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping at the top level, got {type(raw).__name__}"])
    method_raw = raw.pop("method", None)
    model_raw = raw.pop("model", None)
    co_raw = raw.pop("co", None)
    cfg = _fill_dataclass(Config, raw, "", problems)
    cfg.method = _parse_method(method_raw, problems)
    cfg.model = _parse_named_options(ModelConfig, model_raw, "model", problems)
    cfg.co = _parse_co(co_raw, problems)
    _validate(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _parse_named_options(cls: type, raw: Any, where: str, problems: List[str]) -> Any:
    if raw is None:
        return cls()
    if isinstance(raw, str):
        raw = {"name": raw}
    return _fill_dataclass(cls, raw, where, problems)


def _parse_method(raw: Any, problems: List[str]) -> MethodConfig:
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        problems.append(f"method: expected a mapping, got {type(raw).__name__} {raw!r}")
        return MethodConfig()
    raw = dict(raw)
    name = raw.pop("name", MethodConfig.name)
    if isinstance(raw.get("options"), dict):  # accept the nested spelling too
        raw.update(raw.pop("options"))
    if not isinstance(name, str):
        problems.append(f"method.name: expected str, got {type(name).__name__} {name!r}")
        return MethodConfig()
    try:
        registry = _methods()
    except ImportError as exc:  # pragma: no cover - the methods module is part of the package
        problems.append(f"method: cannot import applications.adversarial.methods ({exc})")
        return MethodConfig(name=name, options=raw)
    if name not in registry:
        problems.append(f"method.name: unknown method {name!r}{_did_you_mean(name, sorted(registry))}; "
                        f"valid: {', '.join(sorted(registry))}")
        return MethodConfig(name=name, options=raw)
    cls = registry[name]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    options: Dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            problems.append(f"unknown key 'method.{key}' for method {name!r}{_did_you_mean(str(key), names)}; "
                            f"its options: {', '.join(names)}")
            continue
        ok, v = _coerce(value, hints.get(key, Any))
        if not ok:
            problems.append(f"method.{key}: expected {_type_name(hints[key])}, got {type(value).__name__} {value!r}")
            continue
        options[key] = v
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if required and f.name not in options:
            problems.append(f"method.{f.name}: required by method {name!r}")
    return MethodConfig(name=name, options=options)


def _parse_co(raw: Any, problems: List[str]) -> COConfig:
    if raw is None:
        return COConfig()
    if not isinstance(raw, dict):
        problems.append(f"co: expected a mapping, got {type(raw).__name__} {raw!r}")
        return COConfig()
    raw = dict(raw)
    own = {k: raw.pop(k) for k in ("enabled", "early_stop") if k in raw}
    if isinstance(raw.get("options"), dict):
        raw.update(raw.pop("options"))
    cfg = _fill_dataclass(COConfig, own, "co", problems)
    params = _co_parameters()
    if params is None:
        cfg.options = raw
        return cfg
    for key, value in raw.items():
        if key not in params:
            valid = ["enabled", "early_stop", *params]
            problems.append(f"unknown key 'co.{key}'{_did_you_mean(str(key), valid)}; valid: {', '.join(valid)}")
            continue
        ok, v = _coerce(value, params[key])
        if not ok:
            problems.append(f"co.{key}: expected {_type_name(params[key])}, got {type(value).__name__} {value!r}")
            continue
        cfg.options[key] = v
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """The YAML-able nested mapping of ``cfg`` (method options flat next to the method name)."""
    out = dataclasses.asdict(cfg)
    method = out.pop("method")
    out["method"] = {"name": method["name"], **method["options"]}
    co = out.pop("co")
    out["co"] = {"enabled": co["enabled"], "early_stop": co["early_stop"], **co["options"]}
    return out


# ------------------------------------------------------------------------------------- validation


def _validate(cfg: Config, problems: List[str]) -> None:
    def nonneg(path: str, value: Optional[float]) -> None:
        if value is not None and (not math.isfinite(value) or value < 0):
            problems.append(f"{path}: must be >= 0 and finite, got {value}")

    def positive(path: str, value: Optional[float]) -> None:
        if value is not None and (not math.isfinite(value) or value <= 0):
            problems.append(f"{path}: must be > 0, got {value}")

    if cfg.device != "auto" and not re.match(r"^(cpu|cuda(:\d+)?)$", str(cfg.device)):
        problems.append(f"device: expected auto | cpu | cuda | cuda:N, got {cfg.device!r}")
    if cfg.seed < 0:
        problems.append(f"seed: must be >= 0, got {cfg.seed}")
    if cfg.cpu_threads is not None:
        positive("cpu_threads", cfg.cpu_threads)

    d = cfg.data
    if d.name not in DATASETS:
        problems.append(f"data.name: unknown dataset {d.name!r}{_did_you_mean(d.name, sorted(DATASETS))}; "
                        f"valid: {', '.join(DATASETS)}")
    elif d.name in PATH_REQUIRED and not d.path:
        problems.append(f"data.path: dataset {d.name!r} needs a path (add data.path=/path/to/{d.name})")
    elif d.name in PATH_MUST_EXIST and d.path and not os.path.exists(os.path.expanduser(d.path)):
        problems.append(f"data.path: {d.path!r} does not exist")
    nonneg("data.n_val", d.n_val)
    if d.n_train is not None:
        positive("data.n_train", d.n_train)
    nonneg("data.augmentation.crop", d.augmentation.crop)
    nonneg("data.augmentation.rotation", d.augmentation.rotation)

    try:
        if _model_key(cfg.model.name) is None:
            from .models import MODELS

            problems.append(f"model.name: unknown model {cfg.model.name!r}"
                            f"{_did_you_mean(cfg.model.name, sorted(MODELS))}; valid: {', '.join(sorted(MODELS))}")
    except ImportError as exc:  # pragma: no cover
        problems.append(f"model: cannot import applications.adversarial.models ({exc})")

    m = cfg.method.options
    if "eps" in m and m["eps"] is not None and not (0.0 <= float(m["eps"]) <= 1.0):
        problems.append(f"method.eps: must be in [0, 1] (pixel scale; e.g. 8/255), got {m['eps']}")
    for key, value in m.items():
        if key == "eps" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (key in ("lam", "lmbda", "lambda") or key.endswith(("step", "step_size", "_lr", "alpha", "coef", "steps"))) and (
                math.isnan(float(value)) or value < 0):
            problems.append(f"method.{key}: must be >= 0, got {value}")
    if not any(p.startswith(("method", "unknown key 'method")) for p in problems) and cfg.method.name in _safe_methods():
        try:  # the method's own checks (e.g. eps > 0 for attacks, lam > 0)
            from .methods import build_method

            method = build_method(cfg.method.name, **cfg.method.options)
        except (TypeError, ValueError) as exc:
            problems.append(f"method: {exc}")
        else:
            if cfg.train.compile and method.requires_double_backward:
                problems.append(f"train.compile: method {cfg.method.name!r} needs double backward, "
                                "which torch.compile does not support; set train.compile=false")
    if not any(p.startswith(("eval.eps", "method")) for p in problems) and cfg.eps <= 0:
        problems.append(f"eval.eps: method {cfg.method.name!r} has eps {cfg.eps}; set the evaluation radius "
                        "(e.g. eval.eps=8/255)")

    t = cfg.train
    positive("train.epochs", t.epochs)
    positive("train.batch_size", t.batch_size)
    nonneg("train.lr_max", t.lr_max)
    nonneg("train.momentum", t.momentum)
    nonneg("train.weight_decay", t.weight_decay)
    positive("train.lr_gamma", t.lr_gamma)
    positive("train.nan_check_every", t.nan_check_every)
    if t.max_steps is not None:
        positive("train.max_steps", t.max_steps)
    if not 0.0 < t.lr_peak <= 1.0:
        problems.append(f"train.lr_peak: must be in (0, 1], got {t.lr_peak}")
    if t.lr_schedule not in ("cyclic", "piecewise", "constant"):
        problems.append(f"train.lr_schedule: expected cyclic | piecewise | constant, got {t.lr_schedule!r}"
                        f"{_did_you_mean(t.lr_schedule, ['cyclic', 'piecewise', 'constant'])}")
    if any(ms < 0 for ms in t.lr_milestones):
        problems.append(f"train.lr_milestones: epochs must be >= 0, got {t.lr_milestones}")
    if t.amp not in ("bf16", "fp16", "none"):
        problems.append(f"train.amp: expected bf16 | fp16 | none, got {t.amp!r}")
    if t.nesterov and t.momentum == 0:
        problems.append("train.nesterov: needs train.momentum > 0")

    e = cfg.eval
    if e.eps is not None and not (0.0 <= e.eps <= 1.0):
        problems.append(f"eval.eps: must be in [0, 1], got {e.eps}")
    positive("eval.batch_size", e.batch_size)
    nonneg("eval.val_n", e.val_n)
    positive("eval.val_steps", e.val_steps)
    positive("eval.val_restarts", e.val_restarts)
    positive("eval.test_steps", e.test_steps)
    positive("eval.test_restarts", e.test_restarts)
    if e.test_n is not None:
        positive("eval.test_n", e.test_n)
    nonneg("eval.val_step_size", e.val_step_size)
    nonneg("eval.test_step_size", e.test_step_size)

    if not any(p.startswith(("co.", "unknown key 'co.")) for p in problems) and cfg.co.options:
        try:
            from .overfitting import CatastrophicOverfitting

            CatastrophicOverfitting(**cfg.co.options)
        except (TypeError, ValueError) as exc:
            problems.append(f"co: {exc}")
        except ImportError:  # pragma: no cover
            pass
    if not cfg.output.dir:
        problems.append("output.dir: must not be empty")


# -------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.lr_max=0.1"`` -> (["train", "lr_max"], 0.1). Values go through ``yaml.safe_load``."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key.sub=value"])
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: empty key"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {text!r}: cannot parse the value ({exc})"]) from None
    return key.split("."), parsed


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Returns a copy of the mapping ``raw`` with each ``key.sub=value`` applied (sections created
    as needed). Model and co options may be written flat (``model.width=16``) or nested."""
    out = copy.deepcopy(raw) if raw else {}
    problems: List[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(f"override {text!r}: {part!r} is not a section")
                break
            node = nxt
        else:
            node[path[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def _normalize_sections(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Moves flat model options (``model: {name, width}``) under ``model.options``."""
    model = raw.get("model")
    if isinstance(model, dict):
        extra = {k: model.pop(k) for k in list(model) if k not in ("name", "options")}
        if extra:
            opts = model.setdefault("options", {}) or {}
            if isinstance(opts, dict):
                opts.update(extra)
                model["options"] = opts
    return raw


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """The YAML mapping in ``path`` (ConfigError if missing, unparsable or not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"config file {str(p)!r}: YAML error: {exc}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {str(p)!r}: expected a mapping at the top level"])
    return raw


def load_config(
    path: Union[str, Path, None] = None,
    overrides: Sequence[str] = (),
    base: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Reads the YAML file ``path`` (or starts from ``base``, a stored config mapping), applies the
    ``key=value`` overrides and validates. Raises one :class:`ConfigError` listing every problem."""
    raw: Dict[str, Any] = dict(copy.deepcopy(base)) if base is not None else {}
    if path is not None:
        raw = read_yaml(path)
    raw = apply_overrides(raw, overrides)
    return config_from_dict(_normalize_sections(raw))
