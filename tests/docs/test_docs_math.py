"""The built site shows typeset math, the way a reader sees it: every page with math is opened in headless
Chromium (offline, from file://) and must hold MathJax's output elements and no raw TeX delimiters.

Needs Chromium and the MathJax copy that ``make docs`` caches with npm (fetched here the same way).
Skipped with the reason when either is missing, except under CI (``BILEVEL_REQUIRE_BROWSER=1``, set by
``.ci/run``), where a missing tool is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Tuple

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("BILEVEL_REQUIRE_BROWSER") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (required: BILEVEL_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _hook() -> Any:
    spec = importlib.util.spec_from_file_location("docs_ext_mathjax_hook", ROOT / "docs" / "_ext" / "mathjax_hook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    _unavailable("no chromium on PATH (Debian: apt-get install chromium)")
    return ""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hook = _hook()
    if hook.local_es5() is None:
        if shutil.which("npm") is None:
            _unavailable("no MathJax copy and no npm to fetch one (make docs fetches it)")
        try:
            hook.fetch()
        except (subprocess.CalledProcessError, OSError) as err:
            _unavailable(f"npm pack mathjax@{hook.MATHJAX_VERSION} failed: {err}")
    out = tmp_path_factory.mktemp("site-math")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (out / "javascripts" / "vendor" / "mathjax" / "tex-chtml.js").is_file(), proc.stderr
    return out


def _rendered(chromium: str, page: Path) -> str:
    """The page's DOM after its scripts ran (MathJax typesets on load)."""
    with_home = dict(os.environ, HOME=str(page.parent))  # chromium wants a writable profile location
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120, env=with_home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _math_pages(site: Path) -> List[Tuple[Path, int]]:
    pages = []
    for page in sorted(site.rglob("*.html")):
        n = len(re.findall(r'class="arithmatex"', page.read_text(encoding="utf-8")))
        if n and "vendor" not in page.parts:
            pages.append((page, n))
    return pages


def test_every_math_page_is_typeset_in_a_browser(site: Path) -> None:
    chromium = _chromium()
    pages = _math_pages(site)
    names = {p.relative_to(site).as_posix() for p, _ in pages}
    assert {"index.html", "concepts/constraints.html", "adversarial.html", "api.html"} <= names, names
    with ThreadPoolExecutor(max_workers=2) as pool:
        doms = list(pool.map(lambda item: _rendered(chromium, item[0]), pages))
    for (page, n_math), dom in zip(pages, doms):
        name = page.relative_to(site).as_posix()
        containers = dom.count("<mjx-container")
        assert containers >= n_math, f"{name}: {containers} typeset formulas for {n_math} math elements"
        text = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)
        assert "\\[" not in text and "\\(" not in text, f"{name}: raw TeX delimiters left in the page"
