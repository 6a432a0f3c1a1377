"""The applications' own layout rules (the rules shared by every package are in tests/test_package_layout.py): no
module imports another's private name, nor reaches one through a sibling module's attribute; ``DATASETS`` is
defined once; no module cites a file outside the repository."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "applications"


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
