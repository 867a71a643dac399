"""A seeded Zipf stream of user keys for the routing tests (pure, deterministic)."""

from __future__ import annotations

import bisect
import itertools
import random


def zipf_keys(users: int, count: int, s: float = 1.1, seed: int = 1) -> list[str]:
    """``count`` requests from ``users`` users, user i (1-based) with weight 1 / i**s."""
    cum = list(itertools.accumulate(1.0 / i**s for i in range(1, users + 1)))
    rng = random.Random(seed)
    top = cum[-1]
    return [f"user-{bisect.bisect_left(cum, rng.random() * top) + 1}" for _ in range(count)]
