"""benchmarks/quickstart_candidates.py: every method gets the same number of candidates in every round, a later
round changes one knob of the previous round's choice and nothing else, and every recipe is a valid config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import quickstart_candidates as qc  # noqa: E402
from benchmarks import quickstart_study as qs  # noqa: E402


def _leaves(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_method_gets_the_same_number_of_candidates_in_every_round():
    for rnd in (qc.ROUND1, qc.ROUND2, qc.ROUND3):
        assert set(rnd) == {"fast_bat", "fast_at", "pgd10"}
        assert len({len(c) for c in rnd.values()}) == 1
    for m in qc.CANDIDATES:  # no round reuses a name of another
        assert len(qc.CANDIDATES[m]) == len(qc.ROUND1[m]) + len(qc.ROUND2[m]) + len(qc.ROUND3[m])


@pytest.mark.parametrize("rnd, base, earlier", [(qc.ROUND2, qc.BASE, (qc.ROUND1,)),
                                                (qc.ROUND3, qc.BASE3, (qc.ROUND1, qc.ROUND2))])
def test_a_later_round_changes_one_knob_of_the_previous_choice(rnd, base, earlier):
    """Each candidate is its base's overrides plus one knob: its configuration differs from the base's in that
    knob's keys only (the piecewise schedule sets two), and the base is a candidate of an earlier round."""
    for m, cands in rnd.items():
        pool = {k: v for r in earlier for k, v in r[m].items()}
        assert base[m] in pool
        ref = _leaves(qs.resolved(pool[base[m]]))
        for key, overrides in cands.items():
            assert key.startswith(base[m] + "+") and overrides[:len(pool[base[m]])] == pool[base[m]]
            changed = {k for k, v in _leaves(qs.resolved(overrides)).items() if ref.get(k, "absent") != v}
            assert 1 <= len(changed) <= 2, (key, changed)
            assert len(changed) == 1 or changed == {"train.lr_schedule", "train.lr_milestones"}, (key, changed)


def test_round_3_tries_the_attacks_initialization_the_batch_size_and_the_width():
    for m, cands in qc.ROUND3.items():
        changed = {}
        ref = _leaves(qs.resolved(qc.CANDIDATES[m][qc.BASE3[m]]))
        for overrides in cands.values():
            changed.update({k: v for k, v in _leaves(qs.resolved(overrides)).items() if ref.get(k, "absent") != v})
        assert changed["method.random_start"] is False
        assert {32, 128} <= {qs.resolved(o)["train"]["batch_size"] for o in cands.values()}
        assert changed["model.options"] == {"width": 24}
    assert qs.resolved(qc.ROUND3["fast_bat"]["step187.5_lr0.1+zstep37.5"])["method"]["z_step"] == 37.5


def test_the_selected_recipes_and_the_ablations_are_candidates_of_the_methods():
    assert set(qc.SELECTED) == set(qc.CANDIDATES)
    assert all(k in qc.CANDIDATES[m] for m, k in qc.SELECTED.items())
    assert set(qc.ABLATIONS) <= set(qc.SELECTED)
