"""Hyperparameter optimization by hypergradient descent: per-pixel L2 weights of a logistic regression on digits."""
