r"""The recipes the quickstart study tries (:mod:`benchmarks.quickstart_study`): the tuning's candidates per method,
round by round, the choice per method, and the ablations of the chosen recipes.

Every recipe is a tuple of overrides of the quickstart config (``applications/adversarial/configs/quickstart.yaml``:
Fast-BAT, 15 epochs of batch 64, cyclic learning rate, the small CNN of width 16, on the embedded MNIST digits at
eps 0.3). Each method gets the same number of candidates: the tuning's budget is the same for all three. A round
after the first changes one knob at a time on the previous round's choice, the best-scoring stable candidate by
:func:`benchmarks.quickstart_study.select` (a test holds :data:`BASE` and :data:`BASE3` to it).
"""

from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["ABLATIONS", "BASE", "BASE3", "CANDIDATES", "ROUND1", "ROUND2", "ROUND3", "SELECTED"]

#: Round 1, per method: two attack steps x three peak learning rates (15 epochs of batch 64, cyclic schedule, as
#: the quickstart). Fast-BAT's non-sign step scales the gradient of the summed loss: the official code's 2000/255
#: (for eps 16/255 on CIFAR-10, 125 eps there) is 26 eps at 0.3; the candidates scale it with eps (125 eps and
#: 625 eps, the ratio of its 5000/255 at 8/255). Fast-AT: step eps and 1.25 eps; PGD-10: eps/4 and eps/8.
ROUND1: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "fast_bat": {f"step{step}_lr{lr}": (f"method={{name: fast_bat, eps: 0.3, lam: 10.0, attack_step: {step}}}",
                                         f"train.lr_max={lr}") for step in (37.5, 187.5) for lr in (0.2, 0.1, 0.05)},
    "fast_at": {f"step{step}_lr{lr}": (f"method={{name: fast_at, eps: 0.3, step_size: {step}}}", f"train.lr_max={lr}")
                for step in (0.3, 0.375) for lr in (0.2, 0.1, 0.05)},
    "pgd10": {f"step{step}_lr{lr}": (f"method={{name: pgd, eps: 0.3, steps: 10, step_size: {step}}}",
                                      f"train.lr_max={lr}") for step in (0.075, 0.0375) for lr in (0.2, 0.1, 0.05)},
}

#: Round 1's choice per method (best mean over tuning seeds 0 and 1 of the stable candidates): the base of round 2.
BASE: Dict[str, str] = {"fast_bat": "step187.5_lr0.1", "fast_at": "step0.375_lr0.2", "pgd10": "step0.0375_lr0.1"}

#: Round 2, one knob at a time on the method's round-1 choice, five each. Shared: the schedule (piecewise, /10 at
#: epochs 10 and 13), the cyclic peak (at 30 % of training instead of 50 %), 20 epochs (the main job's ~3-minute
#: budget allows no more; initialization, batch size and width: round 3). Fast-BAT: lambda a decade either side of
#: 10 (``lam: null``, 1/step, collapsed: docs/adversarial.md, "The lambda question"). Fast-AT: lr 0.3 (its
#: round-1 choice sits at the grid's edge) and step 1.5 eps. PGD-10: steps eps/12 and eps/6 around eps/8.
_SHARED = {"piecewise": ("train.lr_schedule=piecewise", "train.lr_milestones=[10, 13]"),
           "peak0.3": ("train.lr_peak=0.3",), "epochs20": ("train.epochs=20",)}
_OWN = {"fast_bat": {"lam1": ("method.lam=1.0",), "lam100": ("method.lam=100.0",)},
        "fast_at": {"lr0.3": ("train.lr_max=0.3",), "step0.45": ("method.step_size=0.45",)},
        "pgd10": {"step0.025": ("method.step_size=0.025",), "step0.05": ("method.step_size=0.05",)}}
ROUND2: Dict[str, Dict[str, Tuple[str, ...]]] = {
    m: {f"{BASE[m]}+{k}": (*ROUND1[m][BASE[m]], *o) for k, o in {**_SHARED, **_OWN[m]}.items()} for m in ROUND1}

#: Round 2's choice per method (best mean over tuning seeds 0 and 1 of the stable candidates of rounds 1 and 2): the
#: base of round 3.
BASE3: Dict[str, str] = {"fast_bat": "step187.5_lr0.1", "fast_at": "step0.375_lr0.2+peak0.3",
                         "pgd10": "step0.0375_lr0.1+epochs20"}

#: Round 3, one knob at a time on round 2's choice, five each. Shared: batch 32 and 128 (the learning rate kept),
#: width 24 (the second convolution has 48 channels: about 1.8 times the time per step of width 16, the most the
#: main job's ~3-minute budget could take) and the attack's zero start (``random_start: false``; Fast-AT from zero
#: is FGSM). Own: Fast-BAT's step from z0 to z (``z_step``, the initialization of its linearization point) at 37.5,
#: a fifth of ``attack_step``; Fast-AT's step eps (round 1 tried it under the cyclic peak at 50 %); PGD-10's lr 0.2
#: (round 1 chose 0.1 for 15 epochs, round 2 then took 20).
_SHARED3 = {"batch32": ("train.batch_size=32",), "batch128": ("train.batch_size=128",),
            "width24": ("model.options={width: 24}",), "zero_start": ("method.random_start=false",)}
_OWN3 = {"fast_bat": {"zstep37.5": ("method.z_step=37.5",)}, "fast_at": {"step0.3": ("method.step_size=0.3",)},
         "pgd10": {"lr0.2": ("train.lr_max=0.2",)}}
ROUND3: Dict[str, Dict[str, Tuple[str, ...]]] = {
    m: {f"{BASE3[m]}+{k}": (*{**ROUND1[m], **ROUND2[m]}[BASE3[m]], *o) for k, o in {**_SHARED3, **_OWN3[m]}.items()}
    for m in ROUND1}

#: Every candidate recipe per method: overrides of the quickstart config, the same number per method.
CANDIDATES: Dict[str, Dict[str, Tuple[str, ...]]] = {m: {**ROUND1[m], **ROUND2[m], **ROUND3[m]} for m in ROUND1}

#: The candidate chosen per method by ``tune`` (:func:`select` of the committed tuning records; the quickstart
#: config *is* Fast-BAT's choice): the comparison runs these.
SELECTED: Dict[str, str] = {"fast_bat": "step187.5_lr0.1", "fast_at": "step0.375_lr0.2+peak0.3",
                            "pgd10": "step0.0375_lr0.1+epochs20+width24"}

#: Ablations: runs that answer a question about a chosen recipe without being candidates (never selected), on the
#: tuning seeds and scored as the candidates are. Fast-BAT without its implicit term (``lam: .inf``, first order:
#: the step's value alone), against its chosen recipe.
ABLATIONS: Dict[str, Dict[str, Tuple[str, ...]]] = {"fast_bat": {"lam_inf": ("method.lam=.inf",)}}
