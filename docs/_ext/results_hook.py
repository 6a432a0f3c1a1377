"""MkDocs hook: serve the committed benchmark plots (``benchmarks/results/*.png``) as ``img/results/<name>``.

The plots are written once, by the benchmark scripts, next to their JSON; the pages link them as
``img/results/<name>.png`` and this hook adds each file to the build as a virtual docs file, so the
site never holds a second, possibly stale, copy in ``docs/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PREFIX = "img/results"


def on_files(files: Files, config: Any) -> Files:
    """Add every ``benchmarks/results/*.png`` as ``img/results/<name>.png``."""
    for path in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{PREFIX}/{path.name}", abs_src_path=str(path)))
    return files
