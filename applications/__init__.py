"""Applications of the bilevel core: adversarial training (Fast-AT, Fast-BAT and peers) and hyperparameter optimization."""
