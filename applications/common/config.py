"""Validation of a run's configuration, shared by the applications: one error listing every problem.

:class:`ConfigError` lists the problems of a configuration, each one line with its key path (capped at
the first :data:`MAX_PROBLEMS` plus a count of the rest, so a file of 200,000 unknown keys gives a short
message, and quickly). The value types accept what a YAML file or an override writes (:data:`Real`: a
finite float, also ``"8/255"``); :func:`describe_error` turns one pydantic error into one line (unknown
keys with a did-you-mean suggestion); :func:`check_options` types the options of a class (a method, a
detector) by the fields of its dataclass, so that the options are documented and checked in one place,
next to the class.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Annotated, Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)

from .errors import UserError

__all__ = ["AnyReal", "ConfigError", "MAX_PROBLEMS", "Real", "Section", "as_float", "check_options", "describe_error",
           "describe_errors", "did_you_mean", "init_fields", "resolved_options"]

#: The problems a :class:`ConfigError` spells out; the rest are counted.
MAX_PROBLEMS = 20


class ConfigError(UserError, ValueError):
    """A configuration with one or more problems; ``problems`` lists each one (``more``: how many beyond
    those were found but not described)."""

    def __init__(self, problems: Sequence[str], more: int = 0) -> None:
        problems = list(problems)
        self.more = more + max(len(problems) - MAX_PROBLEMS, 0)
        self.problems = problems[:MAX_PROBLEMS]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        if self.more:
            lines += f"\n  ... and {self.more} more problem{'s' if self.more != 1 else ''}"
        n = len(self.problems) + self.more
        super().__init__(f"invalid configuration ({n} problem{'s' if n != 1 else ''}):\n{lines}")

    def __add__(self, other: ConfigError) -> ConfigError:
        return ConfigError(self.problems + other.problems, self.more + other.more)


class Section(BaseModel):
    """A section of a configuration: a pydantic model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")


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


def describe_errors(errors: Iterable[Mapping[str, Any]], root: Type[BaseModel],
                    limit: int = MAX_PROBLEMS) -> Tuple[List[str], int]:
    """The first ``limit`` pydantic errors described (:func:`describe_error`), and how many more there were."""
    described: List[str] = []
    more = 0
    for error in errors:
        if len(described) < limit:
            described.append(describe_error(error, root))
        else:
            more += 1
    return described, more


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


def init_fields(cls: type) -> List[str]:
    """The names of the ``__init__`` fields of dataclass ``cls``."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def resolved_options(obj: Any) -> Dict[str, Any]:
    """The ``__init__`` fields of dataclass instance ``obj`` as it runs (defaults resolved), as JSON values: what a
    run's records label it with; objects (e.g. ``products``) by their repr."""
    plain = (bool, int, float, str, type(None))
    return {name: (v if isinstance(v, plain) else repr(v))
            for name in init_fields(type(obj)) for v in [getattr(obj, name)]}


def _lenient(tp: Any, choices: Mapping[type, Sequence[str]]) -> Any:
    """A dataclass field's type for pydantic: floats accept fractions ("8/255") and inf, ints and bools are
    strict, and a field whose type is a subclass of a key of ``choices`` is one of its names (a string in
    the config, which the class's builder turns into the object)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return Union[tuple(_lenient(a, choices) for a in typing.get_args(tp))]  # type: ignore[return-value]
    for base, names in choices.items():
        if isinstance(tp, type) and issubclass(tp, base):
            return Literal[tuple(names)]  # type: ignore[valid-type]
    return {float: AnyReal, int: StrictInt, bool: StrictBool, str: StrictStr}.get(tp, tp)


def _options_model(cls: type, choices: Mapping[type, Sequence[str]]) -> Type[BaseModel]:
    """A pydantic model of the init fields of dataclass ``cls`` (types only; ranges stay the class's)."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            ... if f.default_factory is dataclasses.MISSING else f.default_factory())
        fields[f.name] = (_lenient(hints[f.name], choices), default)
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid"), **fields)


def check_options(cls: type, options: Dict[str, Any], where: str, owner: str,
                  problems: List[str], hint: str = "", choices: Optional[Mapping[type, Sequence[str]]] = None
                  ) -> Tuple[Dict[str, Any], bool]:
    """The known ``options`` typed by the fields of dataclass ``cls``, and whether all of them were
    valid (unknown keys and type errors recorded in ``problems``; ``hint`` ends the last unknown key's;
    ``choices``: named choices of object-valued fields, see :func:`_lenient`)."""
    fields = init_fields(cls)
    unknown = [key for key in options if key not in fields]
    for key in unknown:
        problems.append(f"unknown key '{where}.{key}'{owner}{did_you_mean(str(key), fields)}; "
                        f"valid: {', '.join(fields)}{hint if key == unknown[-1] else ''}")
    known = {k: v for k, v in options.items() if k in fields}
    try:
        model = _options_model(cls, choices or {}).model_validate(known)
    except ValidationError as exc:
        for e in exc.errors():
            if e["type"] == "missing":
                problems.append(f"{where}.{e['loc'][0]}: required{owner}")
            else:
                problems.append(describe_error(e, BaseModel, (where,)))
        return known, False
    return {k: getattr(model, k) for k in known}, len(known) == len(options)
