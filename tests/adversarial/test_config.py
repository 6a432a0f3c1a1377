"""Config schema: every problem reported at once, overrides, and train.py's exit code on a bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from applications.adversarial.config import (
    CONFIG_DIR,
    QUICKSTART,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
)
from applications.common.yamlfile import apply_overrides, parse_override

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "applications" / "adversarial" / "train.py"


def problems_of(overrides, base=None):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides, base=base or {"method": {"name": "fast_bat", "eps": 0.3}})
    return info.value.problems


def test_every_problem_is_listed_once():
    probs = problems_of([
        "trian.epochs=3",                 # unknown section
        "train.lr_mx=0.1",                # unknown key
        "method.name=fast_bta",           # unknown method
        "method.eps=1.5",                 # eps > 1
        "train.lr_max=-0.1",              # negative lr
        "train.epochs=-2",                # negative epochs
        "data.name=cifar10",              # needs a path
        "model.name=resnet9000",          # unknown model
        "train.batch_size=big",           # wrong type
    ])
    text = "\n".join(probs)
    assert len(probs) == 9, text
    assert "unknown key 'trian' (did you mean 'train'?)" in text
    assert "unknown key 'train.lr_mx' (did you mean 'lr_max'?)" in text
    assert "unknown method 'fast_bta' (did you mean 'fast_bat'?)" in text
    assert "method.eps: must be a number in [0, 1]" in text  # the methods' own eps rule
    assert "train.lr_max: must be >= 0" in text
    assert "train.epochs: must be > 0" in text
    assert "data.path: dataset 'cifar10' needs a path" in text
    assert "model.name: unknown model 'resnet9000'" in text
    assert "train.batch_size: expected int, got str 'big'" in text


def test_a_missing_eps_is_one_problem():
    """Beside a misspelt option it was two: check_options' "required" and the method's constructor again."""
    assert problems_of([], base={"method": {"name": "fast_at"}}) == ["method.eps: required for method 'fast_at'"]
    probs = problems_of([], base={"method": {"name": "fast_at", "stepsize": 0.1}})
    assert len(probs) == 2 and sum("required" in p for p in probs) == 1, probs


def test_method_options_are_checked_against_the_method_dataclass():
    probs = problems_of(["method.lam=-1", "method.attack_stp=0.1"])
    text = "\n".join(probs)
    assert "method.lam: must be a number > 0, got -1" in text  # FastBAT's own check
    assert "unknown key 'method.attack_stp' for method 'fast_bat' (did you mean 'attack_step'?)" in text
    # a method without an eps needs the evaluation radius
    assert "eval.eps" in "\n".join(problems_of([], base={"method": {"name": "standard"}}))
    # the detector's own checks surface as config problems
    assert any(p.startswith("co:") for p in problems_of(["co.patience=0"]))


def test_missing_file_path_for_folder_datasets(tmp_path):
    probs = problems_of(["data.name=npz", f"data.path={tmp_path / 'nope.npz'}"])
    assert probs == [f"data.path: {str(tmp_path / 'nope.npz')!r} does not exist"]


def test_overrides_parse_yaml_values_and_fractions():
    assert parse_override("train.lr_max=0.1") == (["train", "lr_max"], 0.1)
    assert parse_override("train.nesterov=true") == (["train", "nesterov"], True)
    assert parse_override("train.lr_milestones=[5, 8]") == (["train", "lr_milestones"], [5, 8])
    assert parse_override("output.name=") == (["output", "name"], None)
    raw = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=4", "data.augmentation.flip=true"])
    assert raw == {"train": {"epochs": 4}, "data": {"augmentation": {"flip": True}}}
    cfg = load_config(None, ["method.name=fast_at", "method.eps=8/255", "model.width=8", "eval.eps=16/255"])
    assert cfg.method.options["eps"] == pytest.approx(8 / 255, rel=1e-15)
    assert cfg.model.options == {"width": 8}
    assert cfg.eps == pytest.approx(16 / 255, rel=1e-15)
    # a whole section can be replaced (switching method drops the old method's options)
    cfg = load_config(QUICKSTART, ["method={name: pgd, eps: 0.3, steps: 2}"])
    assert cfg.method.name == "pgd" and cfg.method.options == {"eps": 0.3, "steps": 2}
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("train.epochs")


def test_round_trip_and_shipped_configs_are_valid():
    cfg = load_config(QUICKSTART)
    again = load_config(None, base=config_to_dict(cfg))
    assert again == cfg and isinstance(again, Config)
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        needs_path = raw.get("data", {}).get("name") not in ("mnist5k", "digits")
        cfg = load_config(path, ["data.path=/data/x"] if needs_path else [])
        assert cfg.train.epochs > 0, path


def test_train_py_exits_2_on_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: fast_bat, eps: 3}\ntrain: {lr_max: -1, epochz: 3}\n")
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(bad), "data.name=svhn",
                           f"output.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "invalid configuration (4 problems)" in err
    for piece in ("method.eps", "train.lr_max", "unknown key 'train.epochz' (did you mean 'epochs'?)", "data.path"):
        assert piece in err
    assert not list(tmp_path.glob("*/last.pt"))  # nothing ran


def test_sections_are_strict_pydantic_models_and_report_key_paths():
    from pydantic import BaseModel

    from applications.adversarial import config as C

    for section in (C.Config, C.DataConfig, C.AugmentConfig, C.ModelConfig, C.MethodConfig, C.TrainConfig,
                    C.EvalConfig, C.COConfig, C.OutputConfig):
        assert issubclass(section, BaseModel) and section.model_config["extra"] == "forbid"
    probs = problems_of([
        "data.augmentation.flp=true",     # nested unknown key
        "data.augmentation.crop=-1",      # nested range
        "train.lr_schedule=cylic",        # literal choice
        "train.nesterov=1",               # bool, not int
        "train.lr_peak=1.5",              # upper bound
        "method.lam=abc",                 # a method option of the wrong type
        "eval.test_n=0",                  # Optional[int] > 0
        "device=gpu",
    ])
    text = "\n".join(probs)
    assert len(probs) == 8, text
    assert "unknown key 'data.augmentation.flp' (did you mean 'flip'?)" in text
    assert "data.augmentation.crop: must be >= 0, got -1" in text
    assert "train.lr_schedule: expected cyclic | piecewise | constant, got 'cylic' (did you mean 'cyclic'?)" in text
    assert "train.nesterov: expected bool, got int 1" in text
    assert "train.lr_peak: must be <= 1, got 1.5" in text
    assert "method.lam: expected float, got str 'abc'" in text
    assert "eval.test_n: must be > 0, got 0" in text
    assert "device: expected auto | cpu | cuda | cuda:N, got 'gpu'" in text


def test_fractions_and_method_option_types():
    cfg = load_config(None, ["train.lr_max=1/10", "method.attack_step=10/255", "method.lam=.inf", "eval.eps=4/255"],
                      base={"method": {"name": "fast_bat", "eps": "8/255"}})
    assert cfg.train.lr_max == pytest.approx(0.1, rel=1e-15)
    assert cfg.method.options["attack_step"] == pytest.approx(10 / 255, rel=1e-15)
    assert cfg.method.options["eps"] == pytest.approx(8 / 255, rel=1e-15) and cfg.method.options["lam"] == float("inf")
    assert cfg.eps == pytest.approx(4 / 255, rel=1e-15)
    # whether the method needs a double backward decides train.compile
    assert any(p.startswith("train.compile:") for p in problems_of(["train.compile=true"]))
    assert load_config(None, ["train.compile=true", "method.lam=.inf"],
                       base={"method": {"name": "fast_bat", "eps": 0.3}}).train.compile
    assert "train.nesterov needs train.momentum > 0" in problems_of(["train.nesterov=true", "train.momentum=0"])


def test_tensorboard_option_needs_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert problems_of(["output.tensorboard=true"]) == [
        'output.tensorboard: needs the tensorboard package: pip install "bilevel[tensorboard]"']


def test_a_malformed_override_does_not_hide_the_other_problems():
    probs = problems_of(["train.epochs", "train.lr_max=-1", "train.epochs=0"])
    assert any("override 'train.epochs'" in p and "key.sub=value" in p for p in probs), probs
    assert any(p.startswith("train.lr_max: must be >= 0") for p in probs), probs
    assert any(p.startswith("train.epochs: must be > 0") for p in probs), probs


def test_switching_method_over_a_config_says_how_to_replace_the_section():
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, ["method.name=fast_at"])
    problems = info.value.problems  # the quickstart's two Fast-BAT options, lam and attack_step
    assert len(problems) == 2 and any("unknown key 'method.lam' for method 'fast_at'" in p for p in problems)
    assert any("unknown key 'method.attack_step' for method 'fast_at'" in p for p in problems)
    # the way out, once: the whole section, with the kept eps
    assert sum("method={name: fast_at, eps: 0.3}" in p for p in problems) == 1, problems
    cfg = load_config(QUICKSTART, ["method={name: fast_at, eps: 0.3}"])
    assert cfg.method.name == "fast_at" and cfg.method.options == {"eps": 0.3}


def test_a_misspelt_option_gets_no_section_hint():
    (problem,) = problems_of(["method.lamb=3"])
    assert "did you mean 'lam'" in problem and "replace the whole section" not in problem
