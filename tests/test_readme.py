"""The README's Python example runs and its printed hypergradient error is tiny."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_matches_closed_form():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], str(README), "exec"), namespace)
    rel_err = float(out.getvalue())
    assert rel_err < 1e-6, out.getvalue()
    assert len(blocks[0].strip().splitlines()) <= 20
