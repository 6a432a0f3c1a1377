"""Fast adversarial training (Fast-AT, Fast-BAT, PGD-AT, GradAlign, N-FGSM) as bi-level problems over :mod:`bilevel`.

One concept per module:

* :mod:`.attacks`: the threat set, the attack as a lower problem, the uniform random start, PGD;
* :mod:`.methods`: the training methods (one dataclass each; its fields are the options);
* :mod:`.evaluation`: clean, PGD and AutoAttack accuracy; :mod:`.models`: the networks;
* :mod:`.data`: datasets as uint8 tensors on the device, augmentation, the device loader;
* :mod:`.config`: the run configuration (YAML, validated); :mod:`.build`: a run's data and model;
* :mod:`.trainer`: the loop, checkpoints, resume, CO detection (:mod:`.overfitting`), data parallelism
  (:mod:`.distributed`), with :mod:`.checkpoint`, :mod:`.records`, :mod:`.schedule`, :mod:`.seeds`;
* :mod:`.train` and :mod:`.evaluate`: the commands (``bilevel-train``, ``bilevel-evaluate``).
"""
