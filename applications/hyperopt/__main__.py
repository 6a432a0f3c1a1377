"""``python -m applications.hyperopt``: tune digits' per-pixel L2 weights by hypergradient descent."""

import sys

from .digits_l2 import cli

sys.exit(cli())
