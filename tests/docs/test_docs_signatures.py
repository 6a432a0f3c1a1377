"""The strategies page's "Signature:" lines name every constructor argument, with the code's defaults.

A signature written without ``...`` claims to be whole: its argument names must be the dataclass's init fields in
order, and a ``name=value`` default must be the code's default (compared by ``repr`` after evaluating it).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import List, Tuple

import pytest

import bilevel as bl

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "concepts" / "strategies.md"
CALL = re.compile(r"`bl\.(\w+)\((.*?)\)`")


def _top_level_args(text: str) -> List[str]:
    """``a, b=f(1, 2), c`` -> ``["a", "b=f(1, 2)", "c"]`` (commas inside brackets do not split)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def _signatures() -> List[Tuple[str, str]]:
    found = []
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        for name, args in CALL.findall(line):
            if hasattr(bl, name) and dataclasses.is_dataclass(getattr(bl, name)) and "..." not in args:
                found.append((name, args))
    return found


def test_the_page_has_signatures_to_check() -> None:
    names = {name for name, _ in _signatures()}
    assert {"Implicit", "Unrolled", "Linearized", "FirstOrder", "CentralDifference", "ForwardDifference"} <= names


@pytest.mark.parametrize("name,args", _signatures(), ids=lambda v: v if isinstance(v, str) and "(" not in v else None)
def test_signature_lists_every_argument_with_its_default(name: str, args: str) -> None:
    cls = getattr(bl, name)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    written = _top_level_args(args)
    assert [a.split("=", 1)[0].strip() for a in written] == [f.name for f in fields], (name, args)
    for arg, field in zip(written, fields):
        if "=" not in arg:
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, arg
            continue
        doc_default = eval(arg.split("=", 1)[1], {"bl": bl})  # noqa: S307 - the page's own text
        code_default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert repr(doc_default) == repr(code_default), (name, field.name)
