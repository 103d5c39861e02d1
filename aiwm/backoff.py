"""Exponential backoff with jitter: pure, so callers pass their own randomness."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int,
    *,
    initial: float = 0.5,
    factor: float = 2.0,
    cap: float = 30.0,
    jitter: float = 0.5,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based).

    The delay grows as ``initial * factor**attempt`` up to ``cap``; ``jitter`` takes up to
    that fraction off at random, so many clients retrying at once spread out.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    try:
        base = min(cap, initial * factor ** min(attempt, 64))
    except OverflowError:
        base = cap
    return base * (1 - jitter * rng())
