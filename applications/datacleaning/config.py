"""The data-cleaning run's configuration: pydantic models of the YAML, ``key=value`` overrides, one error.

Built on the shared layer (:mod:`applications.common`): one :class:`~applications.common.config.ConfigError`
listing every problem with its key path (the first 20 and a count), did-you-mean suggestions, a YAML file
without repeated keys, overrides parsed by YAML, a method's options typed by its dataclass. Sections::

    seed: 0                       # corruption, initialization and every sampler derive from it
    device: cpu                   # cpu | cuda | cuda:N
    cpu_threads: 1                # torch.set_num_threads (null: torch's default)
    dtype: float32                # float32 | float64: the images, the model and the weights
    data:   name (mnist5k | cifar10), path, n_train, n_val, n_test, p, limit_per_class
    model:  name (linear | small_cnn), weight_decay, options: {width, hidden, pool_size}
    weighting: name (logits | network), hidden   # one logit per sample, or Meta-Weight-Net's MLP of the loss
    train:  steps, eval_every, time_budget_s, batch_size, val_batch_size, outer_lr, w0,
            baseline_steps, baseline_lr, baseline_momentum   # batch sizes are global under torchrun
    methods: [name | {name, <that method's options>}, ...]   # run in this order, side by side
    baselines: true               # unweighted and clean-only (oracle) training in the same run
    target_val_loss: null         # time-to-target column of the table (null: the oracle's validation loss)
    output: dir, name, overwrite
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from applications.common.config import ConfigError, Real, Section, check_options, describe_errors, did_you_mean
from applications.common.yamlfile import apply_overrides, read_yaml

from .methods import METHODS, build_method
from .weighting import SampleLogits, Weighting, WeightNet

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "DEFAULT_CONFIG", "DataConfig", "MethodEntry", "ModelConfig", "OutputConfig",
           "TrainConfig", "WeightingConfig", "check_world_size", "config_from_dict", "load_config"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: The default run: MNIST 5k, p = 0.5, the linear model, every method with its tuned options.
DEFAULT_CONFIG = CONFIG_DIR / "mnist_linear.yaml"


class DataConfig(Section):
    """``name``: mnist5k (embedded, offline) or cifar10 (``path``: the image-folder tree or archive);
    splits of the loader's training images: ``n_train`` then ``n_val``; ``n_test`` test images; ``p``: the
    fraction of corrupted training labels; ``limit_per_class``: images per class read from an image folder."""

    name: Literal["mnist5k", "cifar10"] = "mnist5k"
    path: Optional[StrictStr] = None
    n_train: StrictInt = Field(3000, gt=0)
    n_val: StrictInt = Field(1000, gt=0)
    n_test: StrictInt = Field(1000, gt=0)
    p: Real = Field(0.5, ge=0, lt=1)
    limit_per_class: Optional[StrictInt] = Field(None, gt=0)


class ModelConfig(Section):
    """``name``: linear (multinomial logistic regression) or small_cnn; ``weight_decay``: mu of the lower
    problem; ``options``: the small CNN's ``width``, ``hidden``, ``pool_size``."""

    name: Literal["linear", "small_cnn"] = "linear"
    weight_decay: Real = Field(1e-3, ge=0)
    options: Dict[str, StrictInt] = Field(default_factory=dict)


class WeightingConfig(Section):
    """``name``: logits (one weight logit per training sample) or network (Meta-Weight-Net: an MLP
    1 -> ``hidden`` -> 1 of the sample's detached loss; ``train.outer_lr`` is then its plain SGD step;
    ``hidden`` is unused by the logits)."""

    name: Literal["logits", "network"] = "logits"
    hidden: StrictInt = Field(100, gt=0)

    def build(self) -> Weighting:
        return SampleLogits() if self.name == "logits" else WeightNet(self.hidden)


class TrainConfig(Section):
    """``steps`` outer steps per method (or until ``time_budget_s`` seconds of training), evaluated every
    ``eval_every``; mini-batches of ``batch_size`` training and ``val_batch_size`` validation samples;
    ``outer_lr``: SGD's step on the weight logits per sample (the optimizer's lr is ``outer_lr * n_train``,
    since the gradient of a mean over n samples has entries O(1/n)); ``w0``: the initial logit. Baselines:
    ``baseline_steps`` of SGD (``baseline_lr``, ``baseline_momentum``) on batches of ``batch_size``. Under
    ``torchrun`` the batch sizes are global: each of the P processes takes 1/P of every batch."""

    steps: StrictInt = Field(300, gt=0)
    eval_every: StrictInt = Field(30, gt=0)
    time_budget_s: Optional[Real] = Field(None, gt=0)
    batch_size: StrictInt = Field(128, gt=0)
    val_batch_size: StrictInt = Field(128, gt=0)
    outer_lr: Real = Field(10.0, gt=0)
    w0: Real = 0.0
    baseline_steps: StrictInt = Field(1000, gt=0)
    baseline_lr: Real = Field(0.01, gt=0)
    baseline_momentum: Real = Field(0.9, ge=0)


class MethodEntry(Section):
    """A method ``name`` and its options (written flat next to the name; a bare string is the name)."""

    name: StrictStr
    options: Dict[str, Any] = Field(default_factory=dict)


def _entry(raw: Any) -> Any:
    if isinstance(raw, str):
        return {"name": raw}
    if isinstance(raw, dict) and "options" not in raw:
        return {"name": raw.get("name"), "options": {k: v for k, v in raw.items() if k != "name"}}
    return raw


class OutputConfig(Section):
    """Run directory ``dir/name`` (name default: ``<data>_<model>_p<p>_seed<seed>``); ``overwrite``: start
    afresh in a directory that holds a previous run (otherwise the run resumes: finished methods are kept)."""

    dir: StrictStr = Field("runs/datacleaning", min_length=1)
    name: Optional[StrictStr] = None
    overwrite: StrictBool = False


class Config(Section):
    """A whole run."""

    seed: StrictInt = Field(0, ge=0)
    device: StrictStr = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    cpu_threads: Optional[StrictInt] = Field(1, gt=0)
    dtype: Literal["float32", "float64"] = "float32"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: List[MethodEntry] = Field(default_factory=lambda: [MethodEntry(name=n) for n in METHODS])
    baselines: StrictBool = True
    target_val_loss: Optional[Real] = Field(None, gt=0)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("methods", mode="before")
    @classmethod
    def _entries(cls, raw: Any) -> Any:
        return [_entry(r) for r in raw] if isinstance(raw, list) else raw

    def run_name(self) -> str:
        mwn = "_mwn" if self.weighting.name == "network" else ""
        return self.output.name or f"{self.data.name}_{self.model.name}{mwn}_p{self.data.p:g}_seed{self.seed}"

    def to_dict(self) -> Dict[str, Any]:
        out = self.model_dump()
        out["methods"] = [{"name": m["name"], **m["options"]} for m in out["methods"]]
        return out


def _method_problems(cfg: Config, problems: List[str]) -> None:
    """Each method entry's name and options, through the method's dataclass (types, then its range checks)."""
    for i, entry in enumerate(cfg.methods):
        where = f"methods[{i}]"
        cls = METHODS.get(entry.name)
        if cls is None:
            problems.append(f"{where}.name: unknown method {entry.name!r}{did_you_mean(entry.name, list(METHODS))}; "
                            f"valid: {', '.join(METHODS)}")
            continue
        options, ok = check_options(cls, entry.options, where, f" for method {entry.name!r}", problems)
        if ok:
            try:
                build_method(entry.name, **options)
                entry.options = options
            except (TypeError, ValueError) as exc:
                problems.append(f"{where} ({entry.name}): {exc}")
    names = [m.name for m in cfg.methods]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"methods: {name!r} is listed more than once")


def _device_problems(device: str, problems: List[str]) -> None:
    """``device`` must exist on this machine (checked here: nothing is loaded before it is known to)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        problems.append(f"device: {device!r} asked for, but CUDA is not available on this machine; use device=cpu")
    elif ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        problems.append(f"device: {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                        "device(s)")


def config_from_dict(raw: Any) -> Config:
    """A validated :class:`Config` from the YAML mapping; one :class:`ConfigError` listing every problem."""
    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping at the top level, got {type(raw).__name__}"])
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(*describe_errors(exc.errors(), Config)) from None
    problems: List[str] = []
    _method_problems(cfg, problems)
    if cfg.data.name == "cifar10" and not cfg.data.path:
        problems.append("data.path: dataset 'cifar10' needs a path (the image-folder tree or archive)")
    elif cfg.data.path and not Path(cfg.data.path).expanduser().exists():
        problems.append(f"data.path: {cfg.data.path!r} does not exist")
    if not cfg.methods:
        problems.append(f"methods: the list is empty; name at least one of {', '.join(METHODS)}")
    _device_problems(cfg.device, problems)
    if cfg.model.name == "linear" and cfg.model.options:
        problems.append(f"model.options: the linear model takes no options, got {sorted(cfg.model.options)}")
    unknown = set(cfg.model.options) - {"width", "hidden", "pool_size"}
    if cfg.model.name == "small_cnn" and unknown:
        problems.append(f"model.options: unknown {sorted(unknown)}; valid: width, hidden, pool_size")
    if problems:
        raise ConfigError(problems)
    return cfg


def check_world_size(cfg: Config, world_size: int) -> None:
    """Every global batch (``train.batch_size``, ``train.val_batch_size``, the unrolled method's ``unroll_batch``)
    must split evenly over ``world_size`` processes; one :class:`ConfigError` naming each that does not."""
    sizes = {"train.batch_size": cfg.train.batch_size, "train.val_batch_size": cfg.train.val_batch_size}
    for i, entry in enumerate(cfg.methods):
        unroll = getattr(build_method(entry.name, **entry.options), "unroll_batch", None)
        if unroll is not None:
            sizes[f"methods[{i}].unroll_batch"] = unroll
    problems = [f"{key}={size} (the global batch) must be divisible by the number of processes {world_size}"
                for key, size in sizes.items() if size % world_size]
    if problems:
        raise ConfigError(problems)


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Reads the YAML file ``path`` (default: :data:`DEFAULT_CONFIG`), applies ``key.sub=value`` overrides, validates."""
    raw = read_yaml(DEFAULT_CONFIG if path is None else path)
    merged = apply_overrides(raw, overrides)
    if isinstance(raw, dict) and isinstance(merged, dict):
        merged["methods"] = _with_file_options(raw.get("methods"), merged.get("methods"))
    return config_from_dict(merged)


def _with_file_options(file_methods: Any, methods: Any) -> Any:
    """``methods=[soba, f2sa]`` on the command line: a bare name takes that method's options from the file (its
    tuned step sizes), as a name with options (``{name: soba, step_size: 0.05}``) takes only those it gives."""
    if not isinstance(methods, list) or not isinstance(file_methods, list):
        return methods
    tuned = {e["name"]: e for e in file_methods if isinstance(e, dict) and isinstance(e.get("name"), str)}
    return [tuned.get(e, e) if isinstance(e, str) else e for e in methods]
