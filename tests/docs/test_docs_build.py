"""The documentation site builds with ``mkdocs build --strict`` and has what it should.

Skipped when the docs tools are not installed (``pip install -e ".[docs]"``). The build is offline:
the MathJax hook is pointed at an empty cache, so nothing is copied and nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
EXT = ROOT / "docs" / "_ext"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"docs_ext_{name}", EXT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Links(HTMLParser):
    """Collects (href, text) of links inside <nav> elements, and every element id."""

    def __init__(self) -> None:
        super().__init__()
        self.nav_depth = 0
        self.nav_links: List[Tuple[str, str]] = []
        self.ids: Set[str] = set()
        self._href: str = ""
        self._text: List[str] = []
        self._in_a = False

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Any]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "nav":
            self.nav_depth += 1
        elif tag == "a" and self.nav_depth:
            self._in_a, self._href, self._text = True, a.get("href") or "", []

    def handle_endtag(self, tag: str) -> None:
        if tag == "nav":
            self.nav_depth -= 1
        elif tag == "a" and self._in_a:
            self._in_a = False
            self.nav_links.append((self._href, " ".join("".join(self._text).split())))

    def handle_data(self, data: str) -> None:
        if self._in_a:
            self._text.append(data)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _nav_pages(nav: Any) -> Iterator[Tuple[str, str]]:
    """(title, markdown path) for every page of mkdocs.yml's nav."""
    for item in nav:
        if isinstance(item, dict):
            for title, value in item.items():
                if isinstance(value, str):
                    yield title, value
                else:
                    yield from _nav_pages(value)


def _config() -> Dict[str, Any]:
    # mkdocs.yml uses no custom YAML tags, so the safe loader reads it.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               BILEVEL_MATHJAX_DIR=str(out.parent / "no-mathjax-cache"))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_nav_lists_every_page(site: Path) -> None:
    pages = list(_nav_pages(_config()["nav"]))
    assert len(pages) >= 10
    links = _parse(site / "index.html").nav_links
    hrefs = {href.split("#")[0].lstrip("./") for href, _ in links}
    for title, md in pages:
        html = md[: -len(".md")] + ".html"
        assert (site / html).is_file(), f"{md} was not built"
        assert html in hrefs or (html == "index.html" and ("" in hrefs or "index.html" in hrefs)), \
            f"the nav of index.html does not link {html} ({title}); links: {sorted(hrefs)}"
        assert any(title == text for _, text in links), f"nav title {title!r} missing"


def test_every_docs_page_is_in_the_nav() -> None:
    in_nav = {md for _, md in _nav_pages(_config()["nav"])}
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == in_nav


def test_api_page_documents_the_public_surface(site: Path) -> None:
    import bilevel

    api = site / "api.html"
    text = api.read_text(encoding="utf-8")
    assert "LowerProblem" in text
    ids = _parse(api).ids
    missing = [name for name in bilevel.__all__ if f"bilevel.{name}" not in ids]
    assert not missing, f"public names without an entry on the API page: {missing}"


def test_docstring_math_is_rendered_for_mathjax(site: Path) -> None:
    text = (site / "api.html").read_text(encoding="utf-8")
    # reST roles and directives were converted, and arithmatex wrapped them for MathJax.
    assert ":math:`" not in text and ".. math::" not in text and ":class:`" not in text
    assert '<span class="arithmatex">\\(' in text
    assert '<div class="arithmatex">\\[' in text
    concepts = (site / "concepts" / "constraints.html").read_text(encoding="utf-8")
    assert '<div class="arithmatex">\\[' in concepts


def test_pages_load_mathjax_and_no_web_fonts(site: Path) -> None:
    text = (site / "index.html").read_text(encoding="utf-8")
    assert "javascripts/mathjax.js" in text
    assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text
    # Nothing was vendored: the cache was empty, and the build does not download.
    assert not (site / "javascripts" / "vendor").exists()


def test_mathjax_hook_vendors_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _load("mathjax_hook")
    es5 = tmp_path / "cache" / "es5"
    (es5 / "output" / "chtml" / "fonts" / "woff-v2").mkdir(parents=True)
    (es5 / "tex-chtml.js").write_text("// MathJax stand-in")
    (es5 / "output" / "chtml" / "fonts" / "woff-v2" / "MathJax_Main-Regular.woff").write_bytes(b"font")
    monkeypatch.setenv("BILEVEL_MATHJAX_DIR", str(tmp_path / "cache"))
    site_dir = tmp_path / "site"
    hook.on_post_build({"site_dir": str(site_dir)})
    vendor = site_dir / "javascripts" / "vendor" / "mathjax"
    assert (vendor / "tex-chtml.js").read_text() == "// MathJax stand-in"
    assert (vendor / "output" / "chtml" / "fonts" / "woff-v2" / "MathJax_Main-Regular.woff").is_file()
    monkeypatch.setenv("BILEVEL_MATHJAX_DIR", str(tmp_path / "empty"))
    hook.on_post_build({"site_dir": str(tmp_path / "site2")})
    assert not (tmp_path / "site2").exists()


def test_rst_conversion() -> None:
    convert = _load("griffe_rst").convert
    public = {"Implicit", "solve"}
    assert convert(r"a :math:`x^2` b", public) == r"a \(x^2\) b"
    assert convert(":class:`~bilevel.Implicit` and :func:`bilevel.solve`", public) == \
        "[`Implicit`][bilevel.Implicit] and [`bilevel.solve`][bilevel.solve]"
    # Targets outside the public surface become inline code, never a dangling reference.
    assert convert(":mod:`bilevel.solvers` :meth:`hvp`", public) == "`bilevel.solvers` `hvp`"
    one_line = "Intro:\n\n.. math:: a = b\n\nafter"
    assert convert(one_line, public) == "Intro:\n\n\\[\na = b\n\\]\n\nafter"
    block = "Text\n\n.. math::\n\n    x = 1\n    y = 2\n\nMore"
    assert convert(block, public) == "Text\n\n\\[\nx = 1\ny = 2\n\\]\n\nMore"
    indented = "Args:\n    v: see\n\n    .. math:: z\n    next"
    assert convert(indented, public) == "Args:\n    v: see\n\n    \\[\n    z\n    \\]\n\n    next"


def test_pages_show_the_committed_benchmark_plots(site: Path) -> None:
    """Every image a page links resolves in the built site; the benchmark plots are the committed files
    of benchmarks/results (served by docs/_ext/results_hook.py, no copy in docs/)."""
    import re

    results = ROOT / "benchmarks" / "results"
    linked = set()
    for md in (ROOT / "docs").rglob("*.md"):
        for src in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md.read_text(encoding="utf-8")):
            target = (site / md.relative_to(ROOT / "docs").parent / src).resolve()
            assert target.is_file(), f"{md.name} links {src}, which the site lacks"
            if "img/results/" in src:
                linked.add(Path(src).name)
                assert target.read_bytes() == (results / Path(src).name).read_bytes()
    assert {"datacleaning_mnist_linear.png", "datacleaning_mnist_cnn.png"} <= linked
    assert not list((ROOT / "docs").rglob("*.png")), "plots belong in benchmarks/results, served by the hook"
