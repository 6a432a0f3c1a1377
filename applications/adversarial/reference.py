"""What the main job printed across seeds and thread counts, and the line that puts one run beside it.

The quickstart recipe's final test varies with the seed and with the processor (CPU kernels differ between
processors, and the thread count changes the order of floating-point reductions), so one machine's digits
are not a reference. :data:`QUICKSTART` holds the distribution measured by
``python benchmarks/quickstart_study.py stability`` (seeds 0-4 x ``cpu_threads`` 1 and 2, committed in
``benchmarks/results/quickstart_study_cpu.json``; a test checks that the two agree), and
:func:`reference_line` the line ``bilevel-train`` ends with when a run used that recipe (any seed, thread
count, device or output folder).
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, Mapping, Optional

from .config import QUICKSTART as QUICKSTART_CONFIG
from .config import Config, config_to_dict, load_config

__all__ = ["QUICKSTART", "is_quickstart_recipe", "reference_line"]

#: The quickstart's final test over 10 runs (fractions): mean, sample std, min and max; ``config_sha256``:
#: the first 12 hex digits of the SHA-256 of the config file it was measured with.
QUICKSTART: Dict[str, Any] = {
    "config_sha256": "c9b7ccec715a",
    "runs": 10,
    "measured": "seeds 0-4 x cpu_threads 1, 2, Intel Xeon",
    "best_clean": {"mean": 0.9812, "std": 0.0033, "min": 0.976, "max": 0.986},
    "best_pgd": {"mean": 0.78, "std": 0.0158, "min": 0.758, "max": 0.798},
    "last_clean": {"mean": 0.9812, "std": 0.0033, "min": 0.976, "max": 0.986},
    "last_pgd": {"mean": 0.78, "std": 0.0158, "min": 0.758, "max": 0.798},
}

#: Keys that change neither the recipe nor (beyond the seed's and the processor's variation) its result.
_FREE = ("seed", "cpu_threads", "device", "output", "eval.autoattack_n")


def _recipe(cfg: Config) -> Dict[str, Any]:
    d = config_to_dict(cfg)
    for key in _FREE:
        section, _, sub = key.partition(".")
        if sub:
            d.get(section, {}).pop(sub, None)
        else:
            d.pop(section, None)
    return d


def _digest() -> str:
    return hashlib.sha256(QUICKSTART_CONFIG.read_bytes()).hexdigest()[:12]


def is_quickstart_recipe(cfg: Config) -> bool:
    """Whether ``cfg`` is the quickstart config up to the keys of :data:`_FREE` (seed, threads, device, output,
    AutoAttack's image count), and the reference was measured with the config file as it is now."""
    if not QUICKSTART or QUICKSTART.get("config_sha256") != _digest():
        return False
    return _recipe(cfg) == _recipe(load_config(QUICKSTART_CONFIG))


def _inside(value: float, dist: Mapping[str, float]) -> str:
    if dist["min"] <= value <= dist["max"]:
        return "inside the range"
    return "BELOW the range" if value < dist["min"] else "above the range"


def reference_line(cfg: Config, results: Mapping[str, Any]) -> Optional[str]:
    """One line comparing the run's last-checkpoint PGD accuracy (and the best one's) with :data:`QUICKSTART`;
    None when the run is not the quickstart recipe or has no final test."""
    test = results.get("test") or {}
    if "last" not in test or not is_quickstart_recipe(cfg):
        return None
    ref = QUICKSTART
    parts = []
    for name in ("last", "best"):
        d = ref[f"{name}_pgd"]
        value = test[name]["robust_acc"] if name in test else None
        if value is None:
            continue
        parts.append(f"{name} {value:.3f} vs {d['mean']:.3f} ± {d['std']:.3f} [{d['min']:.3f}, {d['max']:.3f}] "
                     f"({_inside(value, d)})")
    return (f"reference: PGD-50 robust accuracy over {ref['runs']} runs of this recipe ({ref['measured']}): "
            + "; ".join(parts) + ". The exact digits vary by seed and processor.")
