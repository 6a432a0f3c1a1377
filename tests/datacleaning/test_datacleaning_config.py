import pytest

from applications.datacleaning.__main__ import main
from applications.datacleaning.config import ConfigError, config_from_dict, load_config


def test_default_config_is_mnist_linear_p05_with_every_method():
    cfg = load_config()
    assert (cfg.data.name, cfg.data.p, cfg.model.name) == ("mnist5k", 0.5, "linear")
    assert (cfg.data.n_train, cfg.data.n_val, cfg.data.n_test) == (3000, 1000, 1000)
    assert {m.name for m in cfg.methods} == {"implicit", "unrolled", "amigo", "stocbio", "soba", "f2sa", "bome"}
    assert load_config(None, ["train.steps=5", "methods=[amigo]"]).train.steps == 5


def test_every_problem_in_one_error():
    raw = {"data": {"p": 1.5, "nmae": "x"}, "train": {"steps": "many"}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    problems = info.value.problems
    assert len(problems) == 3
    text = str(info.value)
    assert "data.p: must be < 1, got 1.5" in text
    assert "unknown key 'data.nmae' (did you mean 'name'?)" in text
    assert "train.steps: expected int" in text


def test_method_options_are_checked_by_the_methods_dataclass():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"methods": [{"name": "amigoo"}, {"name": "soba", "stp_size": 0.1},
                                      {"name": "f2sa", "step_size": -1.0}, "bome", "bome"]})
    text = str(info.value)
    assert len(info.value.problems) == 4
    assert "methods[0].name: unknown method 'amigoo' (did you mean 'amigo'?)" in text
    assert "unknown key 'methods[1].stp_size' for method 'soba' (did you mean 'step_size'?)" in text
    assert "methods[2] (f2sa): step_size must be > 0, got -1.0" in text
    assert "methods: 'bome' is listed more than once" in text


def test_the_command_exits_2_with_the_message(capsys):
    assert main(["data.name=cifar10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration (1 problem)" in err and "data.path: dataset 'cifar10' needs a path" in err


def test_the_weighting_is_checked():
    cfg = config_from_dict({"weighting": {"name": "network", "hidden": 8}})
    assert (cfg.weighting.build().hidden, cfg.run_name()) == (8, "mnist5k_linear_mwn_p0.5_seed0")
    with pytest.raises(ConfigError) as info:
        config_from_dict({"weighting": {"name": "mlp"}})
    assert info.value.problems == ["weighting.name: expected logits | network, got 'mlp'"]
    with pytest.raises(ConfigError, match="weighting.hidden: must be > 0, got 0"):
        config_from_dict({"weighting": {"name": "network", "hidden": 0}})


def test_a_bare_method_name_on_the_command_line_keeps_the_files_options():
    """methods=[soba] used to run SOBA with the code's defaults, not the config's tuned steps; a name with options
    still takes only the options it gives."""
    file_options = {m.name: m.options for m in load_config().methods}
    cfg = load_config(None, ["methods=[soba, f2sa]"])
    assert [(m.name, m.options) for m in cfg.methods] == [("soba", file_options["soba"]), ("f2sa", file_options["f2sa"])]
    assert file_options["soba"]  # the file does tune it
    cfg = load_config(None, ["methods=[{name: soba, step_size: 0.05}]"])
    assert [(m.name, m.options) for m in cfg.methods] == [("soba", {"step_size": 0.05})]

