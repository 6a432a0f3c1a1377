"""Run configuration of the adversarial-training commands: pydantic models of the YAML, overrides, one error.

A run is described by one YAML file (``yaml.safe_load``) with the sections below; every key has a
default, so a file only states what differs. ``key.sub=value`` overrides from the command line are
applied on top (values parsed with ``yaml.safe_load``; any float also accepts a fraction such as
``8/255``). :func:`load_config` validates everything before any work starts and raises ONE
:class:`ConfigError` listing every problem with its key path (unknown keys with a did-you-mean
suggestion, wrong types, out-of-range values, unknown method/model/dataset names, a missing data path).
The sections are pydantic models (``extra="forbid"``, range constraints, literal choices); a method's
options are checked by the method's own dataclass (:mod:`~applications.adversarial.methods`), the
detector's by :class:`~applications.adversarial.overfitting.CatastrophicOverfitting`.

Sections::

    seed: 0                      # all randomness derives from it
    device: auto                 # auto | cpu | cuda | cuda:N
    cpu_threads: null            # torch.set_num_threads on the CPU (null: torch's default)
    data:    name, path, n_val, n_train, augmentation: {crop, flip, rotation}
    model:   name, options: {...}                  # options -> the model constructor
    method:  name, <that method's dataclass fields> (eps, step sizes, lam, ...)
    train:   epochs, batch_size, lr_max, lr_schedule (cyclic | piecewise | constant), lr_peak,
             lr_milestones, lr_gamma, momentum, weight_decay, nesterov, amp (bf16 | fp16 | none; CUDA
             only), channels_last, compile, max_steps, nan_check_every, divergence_factor, max_weight
    eval:    every epoch: val clean accuracy + PGD(val_steps, val_restarts) on val_n images;
             at the end: PGD(test_steps, test_restarts, step eps/4) on test_n test images
    co:      catastrophic-overfitting detector options, enabled, early_stop
    output:  dir, name, overwrite, tensorboard

The learning-rate schedules are :func:`applications.adversarial.schedule.learning_rate`.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from applications.common.config import (
    ConfigError,
    Real,
    Section,
    check_options,
    describe_errors,
    did_you_mean,
)
from applications.common.yamlfile import collect_overrides, read_yaml
from applications.vision.data import DATASETS, PATH_MUST_EXIST, PATH_REQUIRED

from .methods import METHODS
from .methods.options import dataclass_defaults, method_problems

__all__ = [
    "AugmentConfig",
    "COConfig",
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "QUICKSTART",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"


def _options_flat(raw: Any, own: Tuple[str, ...]) -> Any:
    """A section mapping with every key but ``own`` moved under ``options`` (a bare string is the name)."""
    if isinstance(raw, str) and "name" in own:
        return {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("options", {}), dict):
        return raw  # pydantic reports the wrong type
    flat = {k: v for k, v in raw.items() if k not in own and k != "options"}
    return {**{k: raw[k] for k in own if k in raw}, "options": {**raw.get("options", {}), **flat}}


# ----------------------------------------------------------------------------------------- schema


class AugmentConfig(Section):
    """On-device training augmentation: random crop with ``crop`` pixels of zero padding (0: off),
    horizontal flip, random rotation by up to ``rotation`` degrees (0: off)."""

    crop: StrictInt = Field(0, ge=0)
    flip: StrictBool = False
    rotation: Real = Field(0.0, ge=0)


class DataConfig(Section):
    """``name``: one of :data:`~applications.vision.data.DATASETS`; ``path``: file/folder/download root
    (required for all but the embedded mnist5k and digits); ``n_val``: images held out of the training
    split for validation (the last ``n_val``, the paper's 45k/5k protocol); ``n_train``: optional cap on
    the remaining training images (a prefix)."""

    name: Literal[DATASETS] = "mnist5k"  # type: ignore[valid-type]
    path: Optional[StrictStr] = None
    n_val: StrictInt = Field(500, ge=0)
    n_train: Optional[StrictInt] = Field(None, gt=0)
    augmentation: AugmentConfig = Field(default_factory=AugmentConfig)


class _NamedOptions(Section):
    """A ``name`` and its ``options``, written flat next to ``name`` or nested under ``options`` (a bare
    string is the name)."""

    name: StrictStr
    options: Dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, raw: Any) -> Any:
        return _options_flat(raw, ("name",))


class ModelConfig(_NamedOptions):
    """``name``: a name :func:`applications.adversarial.models.build_model` accepts; ``options``:
    keyword arguments of its constructor (``width``, ``hidden`` ... for small_cnn)."""

    name: StrictStr = "small_cnn"

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from . import models

        key = name.strip().lower().replace("-", "_")
        if models.MODEL_ALIASES.get(key, key) not in models.MODELS:
            valid = sorted(models.MODELS)
            raise ValueError(f"unknown model {name!r}{did_you_mean(name, valid)}; valid: {', '.join(valid)}")
        return name


class MethodConfig(_NamedOptions):
    """``name`` plus the options of that method (the fields of ``methods.METHODS[name]``). The options'
    types and ranges are the method's own (checked by :func:`load_config` through its dataclass)."""

    name: StrictStr = "fast_bat"


class TrainConfig(Section):
    """Optimization: SGD (``momentum``, ``weight_decay``, ``nesterov``) for ``epochs`` epochs of
    ``batch_size`` images (the global batch), learning rate by ``lr_schedule``
    (:func:`~applications.adversarial.schedule.learning_rate`); ``amp``: autocast dtype on CUDA (bf16
    recommended: with fp16 the GradScaler scales only the final backward, not the attack's input
    gradients); ``max_steps`` caps the optimizer steps; the loss is checked for NaN/Inf every
    ``nan_check_every`` steps. Divergence (checked after every epoch, before anything is saved): a train
    loss above ``divergence_factor`` times max(ln K, the lowest loss of the earlier epochs), or a weight
    above ``max_weight`` in magnitude; the epoch is then neither saved nor kept."""

    epochs: StrictInt = Field(5, gt=0)
    batch_size: StrictInt = Field(128, gt=0)
    lr_max: Real = Field(0.2, ge=0)
    lr_schedule: Literal["cyclic", "piecewise", "constant"] = "cyclic"
    lr_peak: Real = Field(0.5, gt=0, le=1)
    lr_milestones: List[Annotated[StrictInt, Field(ge=0)]] = Field(default_factory=list)
    lr_gamma: Real = Field(0.1, gt=0)
    momentum: Real = Field(0.9, ge=0)
    weight_decay: Real = Field(5e-4, ge=0)
    nesterov: StrictBool = False
    amp: Literal["bf16", "fp16", "none"] = "none"
    channels_last: StrictBool = False
    compile: StrictBool = False
    max_steps: Optional[StrictInt] = Field(None, gt=0)
    nan_check_every: StrictInt = Field(50, gt=0)
    divergence_factor: Real = Field(10.0, gt=1)
    max_weight: Real = Field(1e4, gt=0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TrainConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("train.nesterov needs train.momentum > 0")
        return self


class EvalConfig(Section):
    """Per-epoch validation: clean accuracy on the whole validation split, PGD robust accuracy
    (``val_steps`` steps, ``val_restarts`` restarts, step ``val_step_size``, default eps/4) on the first
    ``val_n`` validation images. Final test: PGD-``test_steps``-``test_restarts`` with step
    ``test_step_size`` (default eps/4) on the first ``test_n`` test images (null: all) of the best and
    the last checkpoint. ``autoattack_n``: also standard AutoAttack on the first ``autoattack_n`` test
    images of the best checkpoint (needs ``pyautoattack``; null or 0: off; not run, with a note, when
    ``final_test`` is false). ``eps``: attack radius (default: the method's eps)."""

    eps: Optional[Real] = Field(None, ge=0, le=1)
    batch_size: StrictInt = Field(200, gt=0)
    val_n: StrictInt = Field(500, ge=0)
    val_steps: StrictInt = Field(10, gt=0)
    val_restarts: StrictInt = Field(1, gt=0)
    val_step_size: Optional[Real] = Field(None, ge=0)
    test_n: Optional[StrictInt] = Field(1000, gt=0)
    test_steps: StrictInt = Field(50, gt=0)
    test_restarts: StrictInt = Field(10, gt=0)
    test_step_size: Optional[Real] = Field(None, ge=0)
    final_test: StrictBool = True
    autoattack_n: Optional[StrictInt] = Field(None, ge=0)

    @field_validator("autoattack_n")
    @classmethod
    def _zero_is_off(cls, n: Optional[int]) -> Optional[int]:
        return None if n == 0 else n

    @property
    def autoattack_runs(self) -> bool:
        """Whether the run ends with AutoAttack: ``autoattack_n`` set, and the final test on."""
        return self.autoattack_n is not None and self.final_test


class COConfig(Section):
    """Catastrophic-overfitting detection on the per-epoch validation numbers. ``options`` (written flat
    next to ``enabled``) go to ``overfitting.CatastrophicOverfitting``; ``early_stop``: stop training when
    it is detected (the best checkpoint, from before the collapse, is kept either way)."""

    enabled: StrictBool = True
    early_stop: StrictBool = False
    options: Dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, raw: Any) -> Any:
        return _options_flat(raw, ("enabled", "early_stop"))


class OutputConfig(Section):
    """Run directory ``dir/name`` (name default: ``<method>_<model>_<data>_seed<seed>``); ``overwrite``:
    allow starting a fresh run in a directory that already holds a checkpoint; ``tensorboard``: also
    write the per-epoch scalars as TensorBoard events under ``<run>/tensorboard`` (needs the
    ``tensorboard`` package: ``pip install "bilevel[tensorboard]"``)."""

    dir: StrictStr = Field("runs", min_length=1)
    name: Optional[StrictStr] = None
    overwrite: StrictBool = False
    tensorboard: StrictBool = False

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, enabled: bool) -> bool:
        import importlib.util

        if enabled and importlib.util.find_spec("tensorboard") is None:
            raise ValueError('needs the tensorboard package: pip install "bilevel[tensorboard]"')
        return enabled


class Config(Section):
    """A whole run: the sections above plus ``seed``, ``device`` and ``cpu_threads``."""

    seed: StrictInt = Field(0, ge=0)
    device: StrictStr = "auto"
    cpu_threads: Optional[StrictInt] = Field(None, gt=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    co: COConfig = Field(default_factory=COConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", device):
            raise ValueError(f"expected auto | cpu | cuda | cuda:N, got {device!r}")
        return device

    @property
    def eps(self) -> float:
        """Attack radius used for evaluation: ``eval.eps`` or the method's eps."""
        if self.eval.eps is not None:
            return float(self.eval.eps)
        eps = self.method.options.get("eps")
        if eps is None:
            eps = dataclass_defaults(METHODS.get(self.method.name)).get("eps", 8 / 255)
        return float(eps)

    def run_name(self) -> str:
        """``output.name``, or ``<method>_<model>_<data>_seed<seed>``."""
        if self.output.name:
            return self.output.name
        return f"{self.method.name}_{self.model.name}_{self.data.name}_seed{self.seed}"

    def to_dict(self) -> Dict[str, Any]:
        """:func:`config_to_dict` of this config."""
        return config_to_dict(self)


#: The sections of a :class:`Config`, validated one by one when the whole fails (so the checks that
#: need a valid section still run).
_SECTIONS: Dict[str, Type[Section]] = {
    "data": DataConfig, "model": ModelConfig, "method": MethodConfig, "train": TrainConfig,
    "eval": EvalConfig, "co": COConfig, "output": OutputConfig,
}


# ------------------------------------------------------------------------------------ error report

# ------------------------------------------------------------------------------ checks across keys


def _cross_problems(cfg: Dict[str, Any], problems: List[str]) -> None:
    """Checks that need more than one key (only on the sections that validated)."""
    data: Optional[DataConfig] = cfg.get("data")
    if data is not None:
        if data.name in PATH_REQUIRED and not data.path:
            problems.append(f"data.path: dataset {data.name!r} needs a path (add data.path=/path/to/{data.name})")
        elif data.name in PATH_MUST_EXIST and data.path and not os.path.exists(os.path.expanduser(data.path)):
            problems.append(f"data.path: {data.path!r} does not exist")
    method_cfg: Optional[MethodConfig] = cfg.get("method")
    method = method_problems(method_cfg, problems) if method_cfg is not None else None
    train: Optional[TrainConfig] = cfg.get("train")
    if method is not None and train is not None and train.compile and method.requires_double_backward:
        fix = " (or method.products=forward: the implicit gradient by differences)" if hasattr(method, "products") else ""
        problems.append(f"train.compile: method {method_cfg.name!r} needs double backward, "
                        f"which torch.compile does not support; set train.compile=false{fix}")
    eval_cfg: Optional[EvalConfig] = cfg.get("eval")
    if method is not None and eval_cfg is not None and eval_cfg.eps is None and float(method.eps) <= 0:
        problems.append(f"eval.eps: method {method_cfg.name!r} has eps {method.eps}; set the evaluation radius "
                        "(e.g. eval.eps=8/255)")
    co: Optional[COConfig] = cfg.get("co")
    if co is not None and co.options:
        from .overfitting import CatastrophicOverfitting

        options, all_valid = check_options(CatastrophicOverfitting, co.options, "co", "", problems)
        if all_valid:
            co.options = options
            try:
                CatastrophicOverfitting(**options)
            except (TypeError, ValueError) as exc:
                problems.append(f"co: {exc}")


# --------------------------------------------------------------------------------- dict <-> Config


def config_from_dict(raw: Any) -> Config:
    """Builds and validates a :class:`Config` from a nested mapping (the YAML document).

    Raises :class:`ConfigError` listing every problem found.
    """
    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping at the top level, got {type(raw).__name__}"])
    problems: List[str] = []
    more = 0
    cfg: Optional[Config] = None
    try:
        cfg = Config.model_validate(raw)
        sections: Dict[str, Any] = {name: getattr(cfg, name) for name in _SECTIONS}
    except ValidationError as exc:
        described, more = describe_errors(exc.errors(), Config)
        problems.extend(described)
        sections = {}
        for name, model in _SECTIONS.items():
            try:
                sections[name] = model.model_validate(raw.get(name) if raw.get(name) is not None else {})
            except ValidationError:
                pass
    _cross_problems(sections, problems)
    if problems or cfg is None:
        raise ConfigError(problems, more)
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """The YAML-able nested mapping of ``cfg`` (method and detector options flat next to their names)."""
    out = cfg.model_dump()
    method = out.pop("method")
    out["method"] = {"name": method["name"], **method["options"]}
    co = out.pop("co")
    out["co"] = {"enabled": co["enabled"], "early_stop": co["early_stop"], **co["options"]}
    return out


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
    raw, problems = collect_overrides(raw, overrides)  # a malformed override does not hide the other problems
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(problems) + exc from None
    if problems:
        raise ConfigError(problems)
    return cfg
