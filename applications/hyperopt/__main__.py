"""``python -m applications.hyperopt``: tune digits' per-pixel L2 weights by hypergradient descent."""

from .digits_l2 import main

main()
