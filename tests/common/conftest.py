"""The child processes of these tests import this checkout's packages (see tests/adversarial/conftest.py,
which also states the tests' conventions on comparing floats)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
