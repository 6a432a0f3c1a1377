"""The commands and paths the documentation gives exist and are accepted.

* every repository path a page mentions (``applications/.../x.py``, ``.../configs/y.yaml``,
  ``benchmarks/z.py``; ``{a,b}`` alternatives expanded) exists;
* every train command line in a ```bash block (``bilevel-train``, ``python -m applications.adversarial.train``
  or the script ``applications/adversarial/train.py``) parses: its ``--config`` exists and its
  ``key=value`` overrides pass the trainer's configuration validation (no training runs);
* every ``--flag`` given to an installed command or another Python script of the repository in a
  ```bash block is one that script defines (``"--flag"`` appears in its source);
* the installed commands the docs name are the ``[project.scripts]`` of pyproject.toml.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
_PATH = re.compile(r"\b((?:applications|benchmarks|bilevel|tests)/[\w./{},\-]*\.(?:py|yaml))")
_BASH = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
#: installed command (or module run with -m) -> the script that defines it
COMMANDS = {
    "bilevel-train": "applications/adversarial/train.py",
    "applications.adversarial.train": "applications/adversarial/train.py",
    "applications/adversarial/train.py": "applications/adversarial/train.py",
    "bilevel-evaluate": "applications/adversarial/evaluate.py",
    "bilevel-hyperopt": "applications/hyperopt/digits_l2.py",
    "bilevel-datacleaning": "applications/datacleaning/__main__.py",
    "applications.datacleaning": "applications/datacleaning/__main__.py",
}


def _expand(path: str) -> List[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[: m.start()] + alt + path[m.end():])]


def _mentioned_paths() -> Iterator[Tuple[str, str]]:
    for page in PAGES:
        for raw in _PATH.findall(page.read_text(encoding="utf-8")):
            for path in _expand(raw):
                yield page.relative_to(DOCS).as_posix(), path


def _train_commands() -> Iterator[Tuple[str, List[str]]]:
    for page in PAGES:
        for block in _BASH.findall(page.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                tokens = shlex.split(line) if line else []
                starts = [k for k, t in enumerate(tokens) if COMMANDS.get(t) == "applications/adversarial/train.py"]
                if starts:
                    yield page.relative_to(DOCS).as_posix(), tokens[starts[0] + 1:]


def _script_flags() -> Iterator[Tuple[str, str, str]]:
    """(page, script, --flag) for every flag passed to a repository script in a ```bash block."""
    for page in PAGES:
        for block in _BASH.findall(page.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line.split(" #")[0])
                scripts = [k for k, t in enumerate(tokens) if (_PATH.fullmatch(t) and t.endswith(".py")) or t in COMMANDS]
                for k in scripts:
                    for t in tokens[k + 1:]:
                        if t.startswith("--"):
                            yield page.relative_to(DOCS).as_posix(), COMMANDS.get(tokens[k], tokens[k]), t.split("=")[0]


def test_the_docs_mention_paths_and_commands() -> None:
    assert len(list(_mentioned_paths())) > 5
    assert len(list(_train_commands())) > 3
    assert len(list(_script_flags())) > 5


@pytest.mark.parametrize("page,script,flag", sorted(set(_script_flags())))
def test_script_flag_exists(page: str, script: str, flag: str) -> None:
    source = (ROOT / script).read_text(encoding="utf-8")
    assert f'"{flag}"' in source, f"{page}: {script} has no option {flag}"


@pytest.mark.parametrize("page,path", sorted(set(_mentioned_paths())))
def test_mentioned_path_exists(page: str, path: str) -> None:
    assert (ROOT / path).exists(), f"{page} mentions {path}, which does not exist"


@pytest.mark.parametrize("page,args", list(_train_commands()), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_train_command_is_valid(page: str, args: List[str], tmp_path: Path) -> None:
    config = pytest.importorskip("applications.adversarial.config")
    cfg_path, overrides = None, []
    it = iter(args)
    for token in it:
        if token in ("--config", "--resume"):
            value = next(it)
            if token == "--config":
                cfg_path = ROOT / value
                assert cfg_path.is_file(), f"{page}: --config {value} does not exist"
        elif token == "--no-progress":
            continue
        elif token.startswith("--"):
            pytest.fail(f"{page}: train.py has no documented flag {token}")
        else:
            key, _, value = token.partition("=")
            assert _, f"{page}: {token!r} is not a key=value override"
            if key == "data.path":  # the reader's own path: stand in an existing one
                token = f"data.path={tmp_path}"
            overrides.append(token)
    config.load_config(cfg_path or config.QUICKSTART, overrides)


def _project() -> Dict[str, Any]:
    """pyproject.toml's [project] table (tomllib, or tomli before Python 3.11: the `dev` extra installs it)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_installed_commands_are_the_project_scripts() -> None:
    """The commands the docs and README name are pyproject's [project.scripts], and each entry point
    resolves to a callable (the module imports, the function exists)."""
    import importlib

    scripts = _project()["scripts"]
    installed = {name for name in COMMANDS if name.startswith("bilevel-")}
    assert set(scripts) == installed
    text = "".join(page.read_text(encoding="utf-8") for page in PAGES) + (ROOT / "README.md").read_text(encoding="utf-8")
    for name, target in scripts.items():
        assert name in text, f"{name} is not documented"
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        assert (ROOT / COMMANDS[name]).read_text(encoding="utf-8").count(f"def {func}(") == 1


def test_the_extras_table_is_pyprojects() -> None:
    """docs/index.md's table of extras names every [project.optional-dependencies] key once, and no other; the `dev`
    row names the extras that `dev` pulls in."""
    extras = _project()["optional-dependencies"]
    rows = dict(re.findall(r"^\| `([\w-]+)` \| ([^|]*) \|", (DOCS / "index.md").read_text(encoding="utf-8"), re.M))
    assert set(rows) | {"apps"} == set(extras), (sorted(rows), sorted(extras))  # `apps` has its own paragraph
    pulled = re.findall(r"bilevel\[([\w,]+)\]", " ".join(extras["dev"]))
    for extra in ",".join(pulled).split(","):
        assert f"`{extra}`" in rows["dev"], (extra, rows["dev"])


@pytest.mark.parametrize("name", ["bilevel-train", "bilevel-evaluate", "bilevel-hyperopt", "bilevel-datacleaning"])
def test_command_help_is_plain_text(name: str, capsys: pytest.CaptureFixture) -> None:
    """``--help`` prints a description without reST markup (roles, double backticks) a terminal would show raw."""
    import importlib

    target = _project()["scripts"][name]
    module, _, func = target.partition(":")
    with pytest.raises(SystemExit) as stop:
        getattr(importlib.import_module(module), func)(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and not re.search(r":\w+:`|``", text), text
