"""applications/adversarial/reference.py: which runs count as the quickstart recipe, and the closing line that
puts a run's final test beside the measured distribution."""

from __future__ import annotations

import pytest

from applications.adversarial import reference
from applications.adversarial.config import QUICKSTART, load_config

_DIST = {"mean": 0.5, "std": 0.02, "min": 0.47, "max": 0.53, "n": 10}


@pytest.fixture
def measured(monkeypatch):
    """A reference measured with the quickstart config file as it is now."""
    ref = {"config_sha256": reference._digest(), "runs": 10, "measured": "test", "last_pgd": _DIST, "best_pgd": _DIST}
    monkeypatch.setattr(reference, "QUICKSTART", ref)
    return ref


def _results(last, best=None):
    test = {"last": {"robust_acc": last}}
    if best is not None:
        test["best"] = {"robust_acc": best}
    return {"test": test}


def test_the_recipe_ignores_seed_threads_device_output_and_autoattack_count(measured):
    cfg = load_config(QUICKSTART, ["seed=3", "cpu_threads=2", "device=cpu", "output.dir=/tmp/elsewhere",
                                   "output.name=x", "eval.autoattack_n=0"])
    assert reference.is_quickstart_recipe(cfg)


@pytest.mark.parametrize("override", ["train.epochs=3", "method.lam=1.0", "model.options={width: 8}",
                                      "eval.test_n=100", "method.name=fast_at"])
def test_any_other_change_is_another_recipe(measured, override):
    cfg = load_config(QUICKSTART, [override] if override != "method.name=fast_at"
                      else ["method={name: fast_at, eps: 0.3}"])
    assert not reference.is_quickstart_recipe(cfg)
    assert reference.reference_line(cfg, _results(0.5, 0.5)) is None


def test_a_reference_of_another_config_file_is_not_used(measured, monkeypatch):
    monkeypatch.setitem(measured, "config_sha256", "0" * 12)
    assert not reference.is_quickstart_recipe(load_config(QUICKSTART))


@pytest.mark.parametrize("value, verdict", [(0.5, "inside the range"), (0.47, "inside the range"),
                                            (0.4, "BELOW the range"), (0.6, "above the range")])
def test_the_line_places_the_run_in_the_range(measured, value, verdict):
    line = reference.reference_line(load_config(QUICKSTART), _results(value, 0.52))
    assert line.startswith("reference: PGD-50 robust accuracy over 10 runs")
    last, best = line.split("this recipe (test): ")[1].split("; ")
    assert last.startswith(f"last {value:.3f} vs 0.500 ± 0.020 [0.470, 0.530] ({verdict})")
    assert best.startswith("best 0.520") and "(inside the range)" in best


def test_no_line_without_a_final_test(measured):
    assert reference.reference_line(load_config(QUICKSTART), {"test": {}}) is None
