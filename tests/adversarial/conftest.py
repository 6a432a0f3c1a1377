"""Shared setup of the application tests, and their conventions on comparing floats.

The commands these tests start (train.py, evaluate.py, torchrun) import this checkout's packages: an
installed ``bilevel`` (``pip install -e``) may point at another checkout; putting the repository first on
``PYTHONPATH`` makes every child process import the code under test.

Comparing floats (here and in tests/common, tests/vision, tests/datacleaning, tests/hyperopt, tests/benchmarks):

* **Bit equality** (``torch.equal``, ``assert_close(rtol=0, atol=0)``, ``==`` on floats) only where the
  SAME computation is replayed: a resumed run against an uninterrupted one, a checkpoint against what
  was saved, one seed twice, a wrapper that calls the same module (``attack_model``), the same forward
  in another BatchNorm bookkeeping mode, a world-size-independent result against the one-process one,
  and data movement that does no arithmetic (crops, flips, rotations by multiples of 90 degrees,
  uint8 -> float by one IEEE division, which is correctly rounded on every processor).
* **A tolerance** wherever two DIFFERENT computations are compared (a reference formula against the
  library, finite differences against autograd, two kernels or association orders of one sum): a
  relative error (``rtol`` / ``pytest.approx(rel=...)``) or an absolute one in float64 a few ulps above
  the quantity's scale (``atol=1e-15`` for perturbations of size ~0.1 is ~50 ulps), never ``rtol=0,
  atol=0``. Such results can differ in the last bit between processors (AVX2 and AVX-512 kernels sum in
  different orders), so bit equality between them is a portability bug.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
