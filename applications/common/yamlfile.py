"""Reading a run's YAML configuration, and ``key.sub=value`` overrides on top of it.

:func:`read_yaml` is ``yaml.safe_load`` that refuses what would otherwise go wrong silently or loudly: a
key written twice in one mapping (where the last one would win, e.g. a second ``train:`` section that
drops the whole first one), bytes that are not UTF-8 (a binary file given as the config) and a
top level that is not a mapping. Each is one :class:`~applications.common.config.ConfigError` naming the
file, and the line where YAML says so. Override values are parsed by YAML too (``train.epochs=3`` is an
int, ``methods=[soba]`` a list).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .config import ConfigError

__all__ = ["UniqueKeyLoader", "apply_overrides", "collect_overrides", "parse_override", "read_yaml"]


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises on a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        """The mapping of ``node``; a repeated key raises ``yaml.constructor.ConstructorError`` at its line."""
        self.flatten_mapping(node)
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.line + 1}; the second would replace it)",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error on one line."""
    return " ".join(str(exc).split())


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """The YAML mapping in ``path`` (a :class:`ConfigError` if missing, not UTF-8, unparsable, with a repeated
    key, or not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist" + (" (it is a directory)" if p.is_dir() else "")])
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}: "
                           f"{exc.object[exc.start:exc.start + 1]!r}); is it a YAML file?"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {str(p)!r} cannot be read: {exc.strerror or exc}"]) from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([f"config file {str(p)!r}: YAML error: {_yaml_error(exc)}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {str(p)!r}: expected a mapping at the top level, got {type(raw).__name__}"])
    return raw


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.lr_max=0.1"`` -> (["train", "lr_max"], 0.1). Values go through YAML (repeated keys refused)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key.sub=value"])
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: empty key"])
    try:
        parsed = yaml.load(value, Loader=UniqueKeyLoader) if value.strip() else None  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {text!r}: cannot parse the value ({_yaml_error(exc)})"]) from None
    return key.split("."), parsed


def collect_overrides(raw: Optional[Mapping[str, Any]], overrides: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
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


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """A copy of the mapping ``raw`` with each ``key.sub=value`` applied (sections created as needed)."""
    out, problems = collect_overrides(raw, overrides)
    if problems:
        raise ConfigError(problems)
    return out
