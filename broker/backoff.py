"""Reconnect delays: capped exponential backoff with full jitter, as a pure generator.

``delay_n = uniform(0, min(cap_s, base_s * factor**n))`` for attempt ``n = 0, 1, 2, ...``
(AWS Architecture Blog, "Exponential Backoff And Jitter"). Randomness comes from the ``rng``
the caller passes, so tests draw reproducible sequences without sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["ceilings", "full_jitter"]


def ceilings(base_s: float, cap_s: float, *, factor: float = 2.0) -> Iterator[float]:
    """Infinite ``min(cap_s, base_s * factor**n)``; stops multiplying once the cap is reached."""
    if not (0 < base_s <= cap_s) or factor < 1:
        raise ValueError("need 0 < base_s <= cap_s and factor >= 1")
    ceiling = base_s
    while True:
        yield ceiling
        ceiling = min(cap_s, ceiling * factor)


def full_jitter(
    base_s: float, cap_s: float, *, rng: random.Random, factor: float = 2.0
) -> Iterator[float]:
    """Infinite delays, each uniform in ``[0, ceiling_n]``."""
    for ceiling in ceilings(base_s, cap_s, factor=factor):
        yield rng.uniform(0.0, ceiling)
