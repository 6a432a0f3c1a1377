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
import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from .data import DATASETS, PATH_MUST_EXIST, PATH_REQUIRED

__all__ = [
    "AugmentConfig",
    "COConfig",
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "EXIT_CONFIG",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "QUICKSTART",
    "TrainConfig",
    "apply_overrides",
    "as_float",
    "check_options",
    "config_from_dict",
    "describe_error",
    "did_you_mean",
    "config_to_dict",
    "load_config",
    "parse_override",
    "read_yaml",
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


def _fraction(value: Any) -> Any:
    """Before-validator of :data:`Real`: strings such as "8/255" become floats; booleans stay (rejected)."""
    if isinstance(value, str):
        f = as_float(value)
        return value if f is None else f
    return value


#: A float that also accepts "a/b" fractions and numeric strings (not booleans), finite.
Real = Annotated[float, BeforeValidator(_fraction), AllowInfNan(False)]
#: The same, also accepting inf (method options such as ``lam: .inf``).
AnyReal = Annotated[float, BeforeValidator(_fraction)]


def did_you_mean(key: str, valid: Sequence[str]) -> str:
    """The hint `` (did you mean 'x'?)`` for an unknown ``key`` among ``valid`` (empty when none is close)."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _options_flat(raw: Any, own: Tuple[str, ...]) -> Any:
    """A section mapping with every key but ``own`` moved under ``options`` (a bare string is the name)."""
    if isinstance(raw, str) and "name" in own:
        return {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("options", {}), dict):
        return raw  # pydantic reports the wrong type
    flat = {k: v for k, v in raw.items() if k not in own and k != "options"}
    return {**{k: raw[k] for k in own if k in raw}, "options": {**raw.get("options", {}), **flat}}


# ----------------------------------------------------------------------------------------- schema


class AugmentConfig(_Section):
    """On-device training augmentation: random crop with ``crop`` pixels of zero padding (0: off),
    horizontal flip, random rotation by up to ``rotation`` degrees (0: off)."""

    crop: StrictInt = Field(0, ge=0)
    flip: StrictBool = False
    rotation: Real = Field(0.0, ge=0)


class DataConfig(_Section):
    """``name``: one of :data:`~applications.adversarial.data.DATASETS`; ``path``: file/folder/download root
    (required for all but the embedded mnist5k and digits); ``n_val``: images held out of the training
    split for validation (the last ``n_val``, the paper's 45k/5k protocol); ``n_train``: optional cap on
    the remaining training images (a prefix)."""

    name: Literal[DATASETS] = "mnist5k"  # type: ignore[valid-type]
    path: Optional[StrictStr] = None
    n_val: StrictInt = Field(500, ge=0)
    n_train: Optional[StrictInt] = Field(None, gt=0)
    augmentation: AugmentConfig = Field(default_factory=AugmentConfig)


class _NamedOptions(_Section):
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


class TrainConfig(_Section):
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


class EvalConfig(_Section):
    """Per-epoch validation: clean accuracy on the whole validation split, PGD robust accuracy
    (``val_steps`` steps, ``val_restarts`` restarts, step ``val_step_size``, default eps/4) on the first
    ``val_n`` validation images. Final test: PGD-``test_steps``-``test_restarts`` with step
    ``test_step_size`` (default eps/4) on the first ``test_n`` test images (null: all) of the best and
    the last checkpoint. ``autoattack_n``: also standard AutoAttack on the first ``autoattack_n`` test
    images of the best checkpoint (needs ``pyautoattack``; null: off). ``eps``: attack radius (default:
    the method's eps)."""

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
    autoattack_n: Optional[StrictInt] = Field(None, gt=0)

    @model_validator(mode="after")
    def _autoattack_needs_final_test(self) -> EvalConfig:
        if self.autoattack_n is not None and not self.final_test:
            raise ValueError("eval.autoattack_n runs after the final test: it needs eval.final_test=true")
        return self


class COConfig(_Section):
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


class OutputConfig(_Section):
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


class Config(_Section):
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
            eps = _dataclass_defaults(_method_class(self.method.name)).get("eps", 8 / 255)
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
_SECTIONS: Dict[str, Type[_Section]] = {
    "data": DataConfig, "model": ModelConfig, "method": MethodConfig, "train": TrainConfig,
    "eval": EvalConfig, "co": COConfig, "output": OutputConfig,
}


# ------------------------------------------------------------------------------------ error report

_TYPE_NAMES = {"int": "int", "float": "float", "bool": "bool", "string": "str", "dict": "mapping",
               "model": "mapping", "list": "list"}


def _fields_at(model: Type[BaseModel], loc: Sequence[Any]) -> List[str]:
    """The field names of the section model that ``loc`` (a key path) leads into."""
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def describe_error(error: Mapping[str, Any], root: Type[BaseModel], prefix: Tuple[str, ...] = ()) -> str:
    """One pydantic error as one line: ``key.path: what is wrong`` (unknown keys with a suggestion)."""
    loc = prefix + tuple(str(k) for k in error["loc"])
    path = ".".join(loc) or "config"
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        valid = _fields_at(root, loc[len(prefix):-1])
        return f"unknown key {path!r}{did_you_mean(loc[-1], valid)}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = did_you_mean(str(value), choices) if isinstance(value, str) else ""
        return f"{path}: expected {' | '.join(choices)}, got {value!r}{hint}"
    if kind.endswith(("_type", "_parsing")) and kind.rsplit("_", 1)[0] in _TYPE_NAMES:
        expected = _TYPE_NAMES[kind.rsplit("_", 1)[0]]
        return f"{path}: expected {expected}, got {type(value).__name__} {value!r}"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        bound = ctx[key]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{path}: must be {op} {bound}, got {value!r}"
    if kind == "string_too_short":
        return f"{path}: must not be empty"
    if kind == "finite_number":
        return f"{path}: must be finite, got {value!r}"
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        return message if message.startswith(f"{path.split('.')[0]}.") else f"{path}: {message}"
    return f"{path}: {error['msg']}"


# ------------------------------------------------------------------------------ options of classes


def _method_class(name: str) -> Optional[type]:
    from .methods import METHODS

    return METHODS.get(name)


def _dataclass_defaults(cls: Optional[type]) -> Dict[str, Any]:
    if cls is None:
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _lenient(tp: Any) -> Any:
    """A dataclass field's type for pydantic: floats accept fractions ("8/255") and inf, ints and bools are
    strict, and a :class:`bilevel.Products` option is one of the names of ``methods.PRODUCTS`` (a string
    in the config; :func:`~applications.adversarial.methods.build_method` makes it the object)."""
    import bilevel

    from .methods import PRODUCTS

    origin = typing.get_origin(tp)
    if origin is Union:
        return Union[tuple(_lenient(a) for a in typing.get_args(tp))]  # type: ignore[return-value]
    if isinstance(tp, type) and issubclass(tp, bilevel.Products):
        return Literal[tuple(PRODUCTS)]  # type: ignore[valid-type]
    return {float: AnyReal, int: StrictInt, bool: StrictBool, str: StrictStr}.get(tp, tp)


def _options_model(cls: type) -> Type[BaseModel]:
    """A pydantic model of the init fields of dataclass ``cls`` (types only; ranges stay the class's)."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            ... if f.default_factory is dataclasses.MISSING else f.default_factory())
        fields[f.name] = (_lenient(hints[f.name]), default)
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid"), **fields)


def check_options(cls: type, options: Dict[str, Any], where: str, owner: str,
                  problems: List[str], hint: str = "") -> Tuple[Dict[str, Any], bool]:
    """The known ``options`` typed by the fields of dataclass ``cls``, and whether all of them were
    valid (unknown keys and type errors recorded in ``problems``; ``hint`` ends the last unknown key's)."""
    fields = _init_fields(cls)
    unknown = [key for key in options if key not in fields]
    for key in unknown:
        problems.append(f"unknown key '{where}.{key}'{owner}{did_you_mean(str(key), fields)}; "
                        f"valid: {', '.join(fields)}{hint if key == unknown[-1] else ''}")
    known = {k: v for k, v in options.items() if k in fields}
    try:
        model = _options_model(cls).model_validate(known)
    except ValidationError as exc:
        for e in exc.errors():
            if e["type"] == "missing":
                problems.append(f"{where}.{e['loc'][0]}: required{owner}")
            else:
                problems.append(describe_error(e, BaseModel, (where,)))
        return known, False
    return {k: getattr(model, k) for k in known}, len(known) == len(options)


# ------------------------------------------------------------------------------ checks across keys


def _init_fields(cls: type) -> List[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _flow(value: Any) -> str:
    """``value`` as it reads in a one-line YAML mapping."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _method_problems(method: MethodConfig, problems: List[str]) -> Optional[Any]:
    """The method's options through its dataclass (types, then its own range checks); the method or None."""
    from .methods import METHODS, OptionError, build_method, check_eps

    cls = METHODS.get(method.name)
    if cls is None:
        valid = sorted(METHODS)
        problems.append(f"method.name: unknown method {method.name!r}{did_you_mean(method.name, valid)}; "
                        f"valid: {', '.join(valid)}")
        eps = as_float(method.options.get("eps", 0.0))
        try:  # the one option every method has
            check_eps("method", eps if eps is not None else method.options.get("eps"), allow_zero=True)
        except OptionError as exc:
            problems.append(f"method.eps: {exc.detail}")
        return None
    own = _init_fields(cls)
    others = {f for other in METHODS.values() if other is not cls for f in _init_fields(other)}
    hint = ""
    if any(k not in own and k in others for k in method.options):  # options of another method
        kept = ", ".join(f"{k}: {_flow(v)}" for k, v in method.options.items() if k in own)
        hint = (f"; a config written for another method keeps its options when only method.name changes: "
                f"replace the whole section, e.g. method={{name: {method.name}{', ' + kept if kept else ''}}}")
    options, all_valid = check_options(cls, method.options, "method", f" for method {method.name!r}", problems,
                                        hint)
    if not all_valid and len(options) == len(method.options):
        return None  # a type error: the method's own checks would repeat it
    method.options = options
    try:
        return build_method(method.name, **options)
    except OptionError as exc:
        problems.append(f"method.{exc.option}: {exc.detail}")
    except (TypeError, ValueError) as exc:
        problems.append(f"method: {exc}")
    return None


def _cross_problems(cfg: Dict[str, Any], problems: List[str]) -> None:
    """Checks that need more than one key (only on the sections that validated)."""
    data: Optional[DataConfig] = cfg.get("data")
    if data is not None:
        if data.name in PATH_REQUIRED and not data.path:
            problems.append(f"data.path: dataset {data.name!r} needs a path (add data.path=/path/to/{data.name})")
        elif data.name in PATH_MUST_EXIST and data.path and not os.path.exists(os.path.expanduser(data.path)):
            problems.append(f"data.path: {data.path!r} does not exist")
    method_cfg: Optional[MethodConfig] = cfg.get("method")
    method = _method_problems(method_cfg, problems) if method_cfg is not None else None
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
    cfg: Optional[Config] = None
    try:
        cfg = Config.model_validate(raw)
        sections: Dict[str, Any] = {name: getattr(cfg, name) for name in _SECTIONS}
    except ValidationError as exc:
        problems.extend(describe_error(e, Config) for e in exc.errors())
        sections = {}
        for name, model in _SECTIONS.items():
            try:
                sections[name] = model.model_validate(raw.get(name) if raw.get(name) is not None else {})
            except ValidationError:
                pass
    _cross_problems(sections, problems)
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """The YAML-able nested mapping of ``cfg`` (method and detector options flat next to their names)."""
    out = cfg.model_dump()
    method = out.pop("method")
    out["method"] = {"name": method["name"], **method["options"]}
    co = out.pop("co")
    out["co"] = {"enabled": co["enabled"], "early_stop": co["early_stop"], **co["options"]}
    return out


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


def _apply_overrides(raw: Optional[Mapping[str, Any]], overrides: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """:func:`apply_overrides` that returns the problems instead of raising (the valid overrides applied)."""
    out = copy.deepcopy(dict(raw)) if raw else {}
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
    return out, problems


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Returns a copy of the mapping ``raw`` with each ``key.sub=value`` applied (sections created
    as needed). Model and co options may be written flat (``model.width=16``) or nested."""
    out, problems = _apply_overrides(raw, overrides)
    if problems:
        raise ConfigError(problems)
    return out


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
    raw, problems = _apply_overrides(raw, overrides)  # a malformed override does not hide the other problems
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg
