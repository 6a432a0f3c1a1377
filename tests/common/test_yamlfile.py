"""Reading a config: repeated keys and non-UTF-8 bytes are one clear problem, a huge bad file gives a short
message quickly, and overrides are parsed like the file."""

from __future__ import annotations

import time

import pytest

from applications.common.config import MAX_PROBLEMS, ConfigError
from applications.common.yamlfile import apply_overrides, parse_override, read_yaml


def test_a_repeated_section_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\nseed: 1\ntrain:\n  lr_max: 0.1\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    (problem,) = info.value.problems
    assert "duplicate key 'train' (first at line 1" in problem and "line 4" in problem and "\n" not in problem


def test_a_repeated_nested_key_and_override_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        parse_override("method={name: fast_at, name: fast_bat}")


def test_bytes_that_are_not_utf8_are_one_problem(tmp_path):
    path = tmp_path / "random.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert info.value.problems == [f"config file {str(path)!r} is not UTF-8 text (byte 128: b'\\x80'); is it a YAML file?"]


def test_missing_directory_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="it is a directory"):
        read_yaml(tmp_path)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


def test_overrides():
    assert parse_override("train.lr_max=8/255") == (["train", "lr_max"], "8/255")
    assert apply_overrides({"train": {"epochs": 1}}, ["train.epochs=4", "a.b.c=[1, 2]"]) == {
        "train": {"epochs": 4}, "a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError, match="'train' is not a section"):
        apply_overrides({"train": 3}, ["train.epochs=4"])


def test_error_lists_are_capped_and_counted():
    err = ConfigError([f"problem {i}" for i in range(MAX_PROBLEMS + 5)])
    assert len(err.problems) == MAX_PROBLEMS and err.more == 5
    assert str(err).startswith(f"invalid configuration ({MAX_PROBLEMS + 5} problems):")
    assert str(err).endswith("... and 5 more problems")
    both = ConfigError(["a"]) + ConfigError(["b"], more=2)
    assert both.problems == ["a", "b"] and both.more == 2


@pytest.mark.parametrize("app", ["adversarial", "datacleaning"])
def test_a_file_of_200000_unknown_keys_gives_a_short_message_quickly(tmp_path, app):
    """Measured on main before the cap: a 5 MB message after 50 s; here a few kB in seconds."""
    import importlib

    load_config = importlib.import_module(f"applications.{app}.config").load_config
    path = tmp_path / "big.yaml"
    path.write_text("".join(f"key{i}: {i}\n" for i in range(200_000)))
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    elapsed = time.monotonic() - start
    message = str(info.value)
    more = int(message.rsplit("... and ", 1)[1].split()[0])
    assert len(message) < 5000 and more >= 200_000 - MAX_PROBLEMS
    assert "unknown key 'key0'" in message
    assert elapsed < 30, elapsed
