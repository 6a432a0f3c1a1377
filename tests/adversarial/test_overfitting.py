"""Catastrophic-overfitting detector on planted metric streams."""

from __future__ import annotations

import json
import random

import pytest

from applications.adversarial.overfitting import CatastrophicOverfitting, detect_in_stream

# robust accuracy collapses at epoch 3 while clean accuracy keeps rising (FGSM-RS at eps 16/255)
_CLEAN = [0.55, 0.60, 0.64, 0.78, 0.83]
_ROBUST = [0.40, 0.42, 0.44, 0.01, 0.00]


def test_planted_collapse_is_detected_at_its_epoch():
    co = CatastrophicOverfitting()
    fired = [co.update(e, c, r) for e, (c, r) in enumerate(zip(_CLEAN, _ROBUST))]
    assert fired == [False, False, False, True, True]
    assert co.detected and co.epoch == 3 and co.detected_at == 3
    msg = co.message()
    assert "epoch 3" in msg and "0.0100" in msg and "0.4400" in msg and "epoch 2" in msg


def test_patience_reports_onset_and_confirmation():
    co = CatastrophicOverfitting(patience=2)
    fired = [co.update(e, c, r) for e, (c, r) in enumerate(zip(_CLEAN, _ROBUST))]
    assert fired == [False, False, False, False, True]
    assert co.epoch == 3 and co.detected_at == 4
    # a one-epoch dip that recovers does not reach patience 2
    co = CatastrophicOverfitting(patience=2)
    for e, (c, r) in enumerate(zip([0.5, 0.6, 0.65, 0.7, 0.72], [0.30, 0.35, 0.10, 0.36, 0.37])):
        assert not co.update(e, c, r)
    assert not co.detected and co.epoch is None


def test_healthy_stream_is_not_detected():
    clean = [0.35, 0.45, 0.55, 0.60, 0.66, 0.70, 0.74, 0.78, 0.80, 0.81]
    robust = [0.22, 0.28, 0.33, 0.36, 0.39, 0.41, 0.43, 0.45, 0.46, 0.47]
    co = CatastrophicOverfitting()
    assert not any(co.update(e, c, r) for e, (c, r) in enumerate(zip(clean, robust)))
    assert not co.detected and co.epoch is None
    assert co.message() == "no catastrophic overfitting detected"


def test_noisy_healthy_stream_is_not_detected():
    rng = random.Random(0)
    co = CatastrophicOverfitting()
    for e in range(40):
        clean = min(0.9, 0.4 + 0.01 * e) + rng.uniform(-0.04, 0.04)
        robust = min(0.45, 0.2 + 0.008 * e) + rng.uniform(-0.06, 0.06)
        assert not co.update(e, clean, robust), (e, clean, robust)
    assert not co.detected


def test_global_divergence_is_not_co():
    """Both accuracies collapsing (learning rate blow-up) is not catastrophic overfitting."""
    co = CatastrophicOverfitting()
    for e, (c, r) in enumerate(zip([0.5, 0.6, 0.1], [0.3, 0.35, 0.01])):
        assert not co.update(e, c, r)


def test_run_that_never_learns_robustness_is_not_co():
    co = CatastrophicOverfitting()
    for e, (c, r) in enumerate(zip([0.3, 0.5, 0.6], [0.03, 0.04, 0.0])):
        assert not co.update(e, c, r)


def test_absolute_floor_with_loose_ratio():
    co = CatastrophicOverfitting(drop_ratio=0.05, min_robust_acc=0.02)
    assert [co.update(e, c, r) for e, (c, r) in enumerate(zip([0.5, 0.6, 0.7], [0.30, 0.25, 0.02]))] == [False, False, True]
    co = CatastrophicOverfitting(drop_ratio=0.05, min_robust_acc=0.0)
    assert [co.update(e, c, r) for e, (c, r) in enumerate(zip([0.5, 0.6, 0.7], [0.30, 0.25, 0.02]))] == [False, False, False]


def test_state_dict_round_trip_continues_identically():
    full = CatastrophicOverfitting(patience=2)
    half = CatastrophicOverfitting(patience=2)
    stream = list(enumerate(zip(_CLEAN, _ROBUST)))
    for e, (c, r) in stream[:4]:
        full.update(e, c, r)
        half.update(e, c, r)
    state = json.loads(json.dumps(half.state_dict()))  # plain values only
    resumed = CatastrophicOverfitting(patience=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == full.state_dict()
    e, (c, r) = stream[4]
    assert resumed.update(e, c, r) == full.update(e, c, r) is True
    assert resumed.state_dict() == full.state_dict() and resumed.epoch == 3
    with pytest.raises(ValueError, match="best_robust"):
        CatastrophicOverfitting().load_state_dict({k: v for k, v in state.items() if k != "best_robust"})


def test_bad_input_is_rejected():
    co = CatastrophicOverfitting()
    with pytest.raises(ValueError, match="percentage"):
        co.update(0, 55.0, 0.3)
    with pytest.raises(ValueError, match="robust_acc"):
        co.update(0, 0.5, float("nan"))
    with pytest.raises(ValueError, match="drop_ratio"):
        CatastrophicOverfitting(drop_ratio=0.0)
    with pytest.raises(ValueError, match="patience"):
        CatastrophicOverfitting(patience=0)


def test_detect_in_stream_skips_non_validation_records():
    records = []
    for e, (c, r) in enumerate(zip(_CLEAN, _ROBUST)):
        records.append({"epoch": e, "step": 10 * e, "train_loss": 1.0})  # per-step record
        records.append({"epoch": e, "val_clean_acc": c, "val_robust_acc": r, "lr": 0.1})
    assert detect_in_stream(records) == 3
    assert detect_in_stream(records, patience=2) == 3
    healthy = [{"epoch": e, "val_clean_acc": 0.5 + 0.02 * e, "val_robust_acc": 0.3 + 0.01 * e} for e in range(10)]
    assert detect_in_stream(healthy) is None
    # epochs that start at 1 are reported as written
    assert detect_in_stream([{**rec, "epoch": rec["epoch"] + 1} for rec in records]) == 4


# the quickstart run (digits, eps 0.3): epoch 1 is an untrained network whose "robust accuracy" is chance
_EARLY_CLEAN = [0.15, 0.62, 0.71, 0.80, 0.84]
_EARLY_ROBUST = [0.11, 0.04, 0.05, 0.21, 0.30]


def test_untrained_first_epochs_are_not_a_reference():
    co = CatastrophicOverfitting()
    assert not any(co.update(e, c, r) for e, (c, r) in enumerate(zip(_EARLY_CLEAN, _EARLY_ROBUST), start=1))
    assert not co.detected and co.best_robust == 0.30 and co.best_robust_epoch == 5
    # without the clean-accuracy gate (the old rule) epochs 2-3 are flagged against epoch 1's 0.11
    old = CatastrophicOverfitting(min_clean_acc=0.0)
    fired = [old.update(e, c, r) for e, (c, r) in enumerate(zip(_EARLY_CLEAN, _EARLY_ROBUST), start=1)]
    assert fired == [False, True, True, False, False] and old.epoch == 2
    # the gate only delays the reference: a real collapse after training started is still caught
    co = CatastrophicOverfitting()
    stream = list(zip(_EARLY_CLEAN, _EARLY_ROBUST)) + [(0.90, 0.01)]
    assert [co.update(e, c, r) for e, (c, r) in enumerate(stream, start=1)] == [False] * 5 + [True]
    assert co.epoch == 6 and "0.3000 (epoch 5)" in co.message()


def test_message_quotes_the_best_before_the_drop():
    """After the detection the run may go on and beat the old best; the message keeps the pre-drop level."""
    co = CatastrophicOverfitting()
    for e, (c, r) in enumerate(zip(_CLEAN + [0.85, 0.86], _ROBUST + [0.30, 0.50])):
        co.update(e, c, r)
    assert co.epoch == 3 and co.best_robust == 0.50
    msg = co.message()
    assert "0.0100 vs best 0.4400 (epoch 2) before the drop" in msg and "0.5000" not in msg
    assert "(best before 0.6400)" in msg
    # a checkpoint from before these fields existed still loads (they default to None)
    state = {k: v for k, v in co.state_dict().items() if not k.startswith("reference_")}
    old = CatastrophicOverfitting()
    old.load_state_dict(state)
    assert old.reference_robust is None and old.detected and "vs best 0.5000" in old.message()
    with pytest.raises(ValueError, match="min_clean_acc"):
        CatastrophicOverfitting(min_clean_acc=1.5)


# fast_at with step 0.6 at eps 0.3 on MNIST: PGD accuracy near 0 from the first epoch on, accuracy on the
# FGSM training inputs 0.70-0.85: robustness never reaches a reference level, the drop rule is silent
_GAP_CLEAN = [0.80, 0.88, 0.91, 0.93]
_GAP_ROBUST = [0.03, 0.04, 0.01, 0.00]
_GAP_ATTACK = [0.70, 0.78, 0.83, 0.85]  # accuracy under the training attack, a batch of training images
_GAP_PGD = [0.04, 0.05, 0.02, 0.00]  # accuracy under PGD, the same images


def test_gap_signature_detects_co_that_never_had_robustness():
    silent = CatastrophicOverfitting()
    assert not any(silent.update(e, c, r) for e, (c, r) in enumerate(zip(_GAP_CLEAN, _GAP_ROBUST)))
    co = CatastrophicOverfitting()
    fired = [co.update(e, c, r, attack_acc=a, attack_pgd_acc=p)
             for e, (c, r, a, p) in enumerate(zip(_GAP_CLEAN, _GAP_ROBUST, _GAP_ATTACK, _GAP_PGD))]
    assert fired == [True, True, True, True] and co.epoch == 0 and co.detected_at == 0
    msg = co.message()
    assert "training attack" in msg and "0.7000" in msg and "0.0400" in msg and "gap 0.6600" in msg, msg


def test_gap_signature_spares_healthy_and_untrained_runs():
    healthy = CatastrophicOverfitting()  # Fast-BAT: PGD is stronger than the training attack, by a little
    for e, (a, p) in enumerate(zip([0.55, 0.60, 0.64, 0.66], [0.45, 0.50, 0.52, 0.55])):
        assert not healthy.update(e, a + 0.2, p, attack_acc=a, attack_pgd_acc=p)
    untrained = CatastrophicOverfitting()  # right on neither: below min_clean_acc, no signature
    assert not untrained.update(0, 0.3, 0.0, attack_acc=0.40, attack_pgd_acc=0.0)
    strict = CatastrophicOverfitting(max_attack_gap=0.9)
    assert not strict.update(0, 0.9, 0.0, attack_acc=0.85, attack_pgd_acc=0.0)
    with pytest.raises(ValueError, match="max_attack_gap"):
        CatastrophicOverfitting(max_attack_gap=0.0)
    with pytest.raises(ValueError, match="attack_acc"):
        CatastrophicOverfitting().update(0, 0.9, 0.1, attack_acc=85.0, attack_pgd_acc=0.0)


def test_gap_state_round_trips():
    co = CatastrophicOverfitting()
    co.update(0, 0.8, 0.1, attack_acc=0.7, attack_pgd_acc=0.1)
    other = CatastrophicOverfitting()
    other.load_state_dict(json.loads(json.dumps(co.state_dict())))
    assert other.message() == co.message() and other.signature == "gap"
