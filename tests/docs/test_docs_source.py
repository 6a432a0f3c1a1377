"""The docs' and docstrings' TeX survives Python string escapes.

A page or docstring written through a non-raw Python string loses its backslashes: ``\\top`` becomes a tab and
``op``, ``\\rVert`` a carriage return and ``Vert``, ``\\nabla`` a line break and ``abla``. MathJax still typesets
what is left, so only the source shows it: no control character but the line break, in any Markdown page or any
string of the packages' sources, and no line that starts with the tail of a TeX command cut by an escape.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTROL = re.compile(r"[\x07\x08\x09\x0b\x0c\x0d]")
# What is left of \nabla, \newline, \notin (after "\n") and \rVert, \rho, \rightarrow, \rangle (after "\r",
# which a text file turns into a line break) at the start of a line.
CUT_TEX = re.compile(r"^(abla|ewline|otin|Vert|ho\b|ightarrow|angle)", re.MULTILINE)
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
SOURCES = sorted(p for top in ("bilevel", "applications", "benchmarks", "examples")
                 for p in (ROOT / top).rglob("*.py"))


def _problems(text: str) -> List[str]:
    found = [f"control character {m.group()!r} at offset {m.start()}" for m in CONTROL.finditer(text)]
    found += [f"line starts with the cut TeX command {m.group()!r} at offset {m.start()}"
              for m in CUT_TEX.finditer(text)]
    return found


def test_the_checks_find_an_escaped_page() -> None:
    assert _problems("$p^\top A p$") and _problems("$\\lVert b\rVert$") and _problems("$(y - \\eta\nabla_y g)$")
    assert _problems("One line :math:`\theta`.")  # a one-line docstring with \theta: a tab and "heta"
    assert [n.value for n in _docstrings(ast.parse('def f():\n    """One line."""\n'))] == ["One line."]
    assert not _problems("$p^\\top A p$, $\\lVert b\\rVert$, $\\eta\\nabla_y g$\nand a line\n")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_page_keeps_its_backslashes(page: Path) -> None:
    assert not _problems(page.read_text(encoding="utf-8")), page


def _docstrings(tree: ast.AST) -> List[ast.Constant]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return [n.body[0].value for n in nodes if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)]


def test_source_strings_keep_their_backslashes() -> None:
    """Every docstring, one line or many, and every other string of several lines (messages, help texts)."""
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        strings = {id(n): n for n in _docstrings(tree)}
        strings.update({id(n): n for n in ast.walk(tree)
                        if isinstance(n, ast.Constant) and isinstance(n.value, str) and "\n" in n.value})
        for node in strings.values():
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {p}" for p in _problems(node.value)]
    assert not bad, "\n".join(bad)
