"""MkDocs hook: vendor a local MathJax into the built site when one is available (never downloads).

The pages load ``javascripts/mathjax.js``, which tries ``javascripts/vendor/mathjax/tex-chtml.js`` first
and falls back to a CDN copy of the same version. MathJax 3's browser bundle plus fonts is about 2.5 MB,
too large to commit, so this hook copies it from a local cache at build time:

* ``$BILEVEL_MATHJAX_DIR`` if set, else ``<repository>/.cache/mathjax-<version>`` (git-ignored): a
  directory holding MathJax's ``es5/`` tree (the npm package's layout).
* ``make docs`` fills the cache first, with the npm client: ``python docs/_ext/mathjax_hook.py --fetch``
  (runs ``npm pack mathjax@<version>`` and unpacks it; needs the npm registry, the build does not), so
  the built site typesets its math offline. ``tests/docs/test_docs_math.py`` opens the pages in headless
  Chromium and checks that it did.

Without a cache the build still succeeds offline and the site typesets math through the CDN when viewed
online. The build itself never touches the network.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

MATHJAX_VERSION = "3.2.2"
# What the site needs from es5/: the TeX -> CommonHTML bundle, its fonts, the TeX extensions it may
# autoload, and the menu code.
_PARTS = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui")

log = logging.getLogger("mkdocs.hooks.mathjax")


def cache_dir() -> Path:
    """Where the MathJax copy is cached (see the module docstring)."""
    env = os.environ.get("BILEVEL_MATHJAX_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / f"mathjax-{MATHJAX_VERSION}"


def local_es5() -> Optional[Path]:
    """The cached ``es5`` directory, or ``None`` if there is no usable cache."""
    root = cache_dir()
    for candidate in (root / "es5", root / "package" / "es5", root):
        if (candidate / "tex-chtml.js").is_file():
            return candidate
    return None


def on_post_build(config: Any, **kwargs: Any) -> None:
    es5 = local_es5()
    if es5 is None:
        log.info("MathJax: no local copy in %s; the site will load MathJax %s from the CDN "
                 "(run `python docs/_ext/mathjax_hook.py --fetch` once to vendor it)", cache_dir(), MATHJAX_VERSION)
        return
    dest = Path(config["site_dir"]) / "javascripts" / "vendor" / "mathjax"
    for part in _PARTS:
        src = es5 / part
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        elif src.is_file():
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    log.info("MathJax: vendored %s from %s", MATHJAX_VERSION, es5)


def fetch() -> Path:
    """Fill the cache with ``npm pack mathjax@VERSION`` (the only step that needs a registry)."""
    root = cache_dir()
    if local_es5() is not None:
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("mathjax_hook: npm is not installed; install Node.js/npm or set BILEVEL_MATHJAX_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--silent"], cwd=tmp, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(Path(tmp) / out) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/es5/") and m.isfile()]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(Path(tmp) / "package" / "es5", root / "es5")
    return root


if __name__ == "__main__":
    if sys.argv[1:] == ["--fetch"]:
        print(f"MathJax {MATHJAX_VERSION} cached in {fetch()}")
    else:
        print(f"usage: python {sys.argv[0]} --fetch    (cache: {cache_dir()}; present: {local_es5() is not None})")
