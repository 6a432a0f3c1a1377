"""The commands these tests start (train.py, evaluate.py, torchrun) import this checkout's packages.

An installed ``bilevel`` (``pip install -e``) may point at another checkout; putting the repository
first on ``PYTHONPATH`` makes every child process import the code under test.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
