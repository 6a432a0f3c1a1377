"""The application's layout rules, checked on its sources: every module has a docstring and an ``__all__``
that lists exactly its public top-level definitions, each documented; no module imports another's private
name; ``DATASETS`` is defined once; no docstring cites a file outside the repository."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "applications" / "adversarial"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_public_names_are_exported_and_documented(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{path.name} has no module docstring"
    module = importlib.import_module(module_name(path))
    exported = getattr(module, "__all__", None)
    if path.name == "__init__.py" and exported is None:
        return  # a package without a public surface of its own
    assert exported is not None, f"{path.name} has no __all__"
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    if path.name != "__init__.py":
        assert defined <= set(exported), f"{path.name}: public but not in __all__: {sorted(defined - set(exported))}"
    for name in exported:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_no_private_name_crosses_modules_and_datasets_is_defined_once() -> None:
    crossings, datasets = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("applications")):
                crossings += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("models", "data", "methods", "attacks"):
                crossings.append(f"{path.name}: {node.value.id}.{node.attr}")
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            datasets += [path.name for t in targets if isinstance(t, ast.Name) and t.id == "DATASETS"]
        assert "REFERENCE" not in path.read_text(encoding="utf-8"), f"{path.name} cites a file outside the repository"
    assert crossings == []
    assert datasets == ["sources.py"]
