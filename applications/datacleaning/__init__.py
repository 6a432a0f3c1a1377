"""Learning per-sample weights under label noise (data cleaning) with the stochastic bi-level methods of :mod:`bilevel`.

One concept per module:

* :mod:`.corruption`: exactly a fraction p of the labels replaced by random wrong ones;
* :mod:`.data`: the noisy train / clean validation / test splits (the adversarial app's loaders);
* :mod:`.models`: the linear model and the small CNN as functions of a parameter dict;
* :mod:`.weighting`: the upper variable's weights: one logit per sample, or Meta-Weight-Net's network;
* :mod:`.problem`: the bi-level program (weighted training loss below, validation loss above);
* :mod:`.methods`: one dataclass per method (Implicit, Unrolled, AmIGO, StocBiO, SOBA, F2SA, BOME);
* :mod:`.runner`: one method's run (SGD on the weight logits, evaluations) and the fixed-weight baselines;
* :mod:`.weights`: ROC-AUC and precision / recall of the learned weights;
* :mod:`.config`, :mod:`.experiment`, :mod:`.report`: the YAML run, its checkpoints and records, the table;
* ``python -m applications.datacleaning``: the command.
"""
