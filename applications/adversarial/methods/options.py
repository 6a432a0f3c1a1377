"""The typing of a method's options in a run's configuration, next to the methods it types.

A method's options are the fields of its dataclass: :func:`method_problems` types the ``method`` section
of a configuration by them (:func:`~applications.common.config.check_options`: floats accept "8/255", the
``products`` option one of the names of :data:`~.fast_bat.PRODUCTS`) and then runs the method's own range
checks by building it, so that every problem is reported with its key path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import yaml

import bilevel
from applications.common.config import as_float, check_options, did_you_mean, init_fields

from . import METHODS, PRODUCTS, OptionError, TrainingMethod, build_method, check_eps

__all__ = ["dataclass_defaults", "method_problems"]


def dataclass_defaults(cls: Optional[type]) -> Dict[str, Any]:
    """The defaults of the fields of dataclass ``cls`` that have one (empty for None)."""
    if cls is None:
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _flow(value: Any) -> str:
    """``value`` as it reads in a one-line YAML mapping."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def method_problems(method: Any, problems: List[str]) -> Optional[TrainingMethod]:
    """The options of the config's method section (``method.name``, ``method.options``, replaced by the typed
    options) through the method's dataclass: types, then the method's own range checks. Problems are
    appended to ``problems``; returns the method, or None."""
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
    own = init_fields(cls)
    others = {f for other in METHODS.values() if other is not cls for f in init_fields(other)}
    hint = ""
    if any(k not in own and k in others for k in method.options):  # options of another method
        kept = ", ".join(f"{k}: {_flow(v)}" for k, v in method.options.items() if k in own)
        hint = (f"; a config written for another method keeps its options when only method.name changes: "
                f"replace the whole section, e.g. method={{name: {method.name}{', ' + kept if kept else ''}}}")
    options, all_valid = check_options(cls, method.options, "method", f" for method {method.name!r}", problems,
                                        hint, choices={bilevel.Products: PRODUCTS})
    if not all_valid and len(options) == len(method.options):
        return None  # a type error: the method's own checks would repeat it
    method.options = options
    if any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in options
           for f in dataclasses.fields(cls) if f.init):
        return None  # a required option is missing: check_options said so, build_method would say it again
    try:
        return build_method(method.name, **options)
    except OptionError as exc:
        problems.append(f"method.{exc.option}: {exc.detail}")
    except (TypeError, ValueError) as exc:
        problems.append(f"method: {exc}")
    return None
