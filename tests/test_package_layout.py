"""Layout rules of every package, checked on its sources: each module has a docstring and an ``__all__``
that lists its public top-level definitions, each documented; no module imports another module's private
name; no file of the repository cites a document outside it. (Package-specific rules live beside each
package's tests, e.g. tests/adversarial/test_layout.py.)"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "bilevel", ROOT / "applications"]
MODULES = sorted(p for package in PACKAGES for p in package.rglob("*.py") if p.name != "__main__.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
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
    objects = {name: getattr(module, name, None) for name in exported}  # None: a lazily imported submodule
    undocumented = [name for name, obj in objects.items()
                    if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj)]
    assert undocumented == [], f"{module.__name__}: no docstring for {undocumented}"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_private_name_crosses_modules(package: Path) -> None:
    crossings = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(package.name)):
                crossings += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert crossings == []


def test_nothing_cites_a_file_outside_the_repository() -> None:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    marker = "REFERENCE" + " §"  # split so that this file does not match itself
    cites = [f for f in files if f.endswith((".py", ".md", ".yaml", ".yml", ".sh"))
             and marker in (ROOT / f).read_text(encoding="utf-8", errors="replace")]
    assert cites == []


def _imported_packages(path: Path) -> set:
    """The ``applications.<x>`` packages that the module at ``path`` imports (absolute or relative)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's own package
                pkg = parts[:-1]  # the package of the module (of __init__.py: the package itself)
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("applications.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", ["adversarial", "datacleaning", "hyperopt", "common", "vision"])
def test_no_application_imports_another(package: str) -> None:
    """The applications share code only through applications/common (the run layer) and applications/vision
    (datasets, the small CNN); those two import no application."""
    allowed = {package, "common", "vision"} if package not in ("common", "vision") else {package, "common"}
    bad = {f"{p.relative_to(ROOT)}: {sorted(_imported_packages(p) - allowed)}"
           for p in sorted((ROOT / "applications" / package).rglob("*.py")) if _imported_packages(p) - allowed}
    assert sorted(bad) == []



def test_no_application_source_file_is_over_450_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in sorted((ROOT / "applications").rglob("*.py"))}
    assert {k: v for k, v in sizes.items() if v > 450} == {}
