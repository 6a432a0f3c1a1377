r"""Griffe extension: render the reST markup of bilevel's docstrings as Markdown for mkdocstrings.

The library's docstrings are Google style with a few reST constructs that Markdown does not know:

* ``:math:`x^2``` becomes ``\(x^2\)`` and a ``.. math::`` directive (one line, or an indented block)
  becomes a ``\[ ... \]`` display block; ``pymdownx.arithmatex`` (generic mode) then wraps both for MathJax.
* ``:class:`~bilevel.Implicit``` (and ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ...) becomes an
  autorefs link when the target is a public name of the package (its ``__all__``), which the API page
  renders, and inline code otherwise, so a strict build never sees an unresolvable reference.

The docstrings themselves are left untouched (they read well in ``help()``); only the copies griffe
hands to mkdocstrings are rewritten, once the whole package is loaded.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, List, Set

from griffe import Extension

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def convert_math_directives(text: str) -> str:
    r"""Replace every ``.. math::`` directive by a blank-line-separated ``\[ ... \]`` block."""
    lines = text.split("\n")
    out: List[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        body: List[str] = [m.group("rest")] if m.group("rest").strip() else []
        j = i + 1
        block: List[str] = []
        while j < len(lines) and (not lines[j].strip() or _indent_of(lines[j]) > len(indent)):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
            j -= 1
        nonblank = [ln for ln in block if ln.strip()]
        if nonblank:
            cut = min(_indent_of(ln) for ln in nonblank)
            body.extend(ln[cut:] if ln.strip() else "" for ln in block)
        while body and not body[0].strip():
            body.pop(0)
        if out and out[-1].strip():
            out.append("")
        out.append(indent + r"\[")
        out.extend((indent + ln) if ln else "" for ln in body)
        out.append(indent + r"\]")
        if j < len(lines) and lines[j].strip():
            out.append("")
        i = j
    return "\n".join(out)


def convert_roles(text: str, public: Set[str], package: str) -> str:
    """Replace inline math and cross-reference roles."""
    text = _MATH_ROLE.sub(lambda m: r"\(" + m.group(1) + r"\)", text)

    def xref(m: re.Match) -> str:
        target = m.group(1).strip()
        short = target.startswith("~")
        target = target.lstrip("~").strip()
        display = target.rsplit(".", 1)[-1] if short else target
        name = target[len(package) + 1:] if target.startswith(package + ".") else target
        if name in public:
            return f"[`{display}`][{package}.{name}]"
        return f"`{display}`"

    return _XREF_ROLE.sub(xref, text)


def convert(text: str, public: Iterable[str], package: str = "bilevel") -> str:
    """The whole rewrite of one docstring."""
    return convert_roles(convert_math_directives(text), set(public), package)


def _walk(obj: Any, seen: Set[int]) -> Iterable[Any]:
    if id(obj) in seen or getattr(obj, "is_alias", False):
        return
    seen.add(id(obj))
    yield obj
    for member in getattr(obj, "members", {}).values():
        yield from _walk(member, seen)


class RstToMarkdown(Extension):
    """Rewrites the docstrings of a package once it is fully loaded."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        public = {str(name) for name in (pkg.exports or ())}
        for obj in _walk(pkg, set()):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, public, pkg.name)
