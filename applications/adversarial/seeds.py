"""Every random stream of a run derives from its one ``seed`` through :func:`mix_seed`."""

from __future__ import annotations

import enum

__all__ = ["Stream", "mix_seed"]


class Stream(enum.IntEnum):
    """The tag that separates a run's random streams: ``mix_seed(seed, Stream.DATA, epoch)`` orders and
    augments epoch ``epoch``; ``METHOD`` seeds the methods' random starts; ``VAL`` and ``TEST`` the
    random starts of the validation and test attacks (re-seeded for every evaluation); ``CHECK`` the
    catastrophic-overfitting check on training images (``mix_seed(seed, Stream.CHECK, epoch)``)."""

    DATA = 1
    METHOD = 2
    VAL = 3
    TEST = 4
    CHECK = 5


def mix_seed(seed: int, *tags: int) -> int:
    """A deterministic 62-bit seed derived from ``seed`` and integer ``tags`` (splitmix64-style)."""
    h = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    for t in tags:
        h ^= (int(t) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 2
