"""Opt-in bounded load: spill a key's request past an overloaded owner. Pure.

"Consistent hashing with bounded loads" (Mirrokni, Thorup, Zadimoghaddam, arXiv:1608.01350)
as HAProxy (``hash-balance-factor``) and Envoy (``hash_balance_factor``) apply it to requests
in flight. With a balance factor ``f`` (1.25 = 125 %), the in-flight requests of the usable
backends, this one included, get ``ceil(f * (total + 1))`` slots between them, shared in
proportion to weight and never fewer than one per backend:

    capacity(b) = max(1, ceil(f * (total + 1) * weight(b) / total_weight))

where ``total`` is the in-flight count summed over the usable backends and ``total_weight``
their weights (so ``total / total_weight`` is the weighted mean). A backend is within the
bound when sending it this request keeps it at or under its capacity:
``inflight(b) + 1 <= capacity(b)``, HAProxy's ``served < slots``. A request goes to the first
backend of the key's preference list (its owner first) that is within the bound.

Invariants:

- If the candidates are exactly the usable backends whose in-flight counts make up
  ``total``, one of them is always within the bound (the capacities add up to at least
  ``f * (total + 1) >= total + 1`` slots for ``total`` requests), so nothing is ever refused
  for load.
- When every candidate is above the bound (only possible when the candidates are a subset
  of the backends counted in ``total``), the request goes to the candidate least loaded
  relative to its capacity, the earliest in preference order on a tie (Envoy's choice): the
  owner keeps the request unless another candidate is strictly less loaded.
- Arithmetic is on integers (the factor as a whole percentage), so every proxy computes the
  same capacities from the same counts. Counts differ between proxies, though: a key's
  spilled requests may go to different backends from different proxies. This weakens P1
  (DESIGN.md §3), which is why it is off unless configured.

Cost: ``within`` is a few integer operations and allocates nothing: the router asks it of
the owner first, and only when the owner is full builds the candidates' counts for
``choose``, which walks them once. In-flight counts live in the data plane (Upstream) and
weights in routing (BackendState), so both are passed as plain integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# HAProxy and Envoy both refuse a factor under 100 %: fewer slots than requests.
MIN_PERCENT: Final = 100
# Far above any useful bound (10x the mean) yet small enough to catch a factor given as a
# percentage by mistake (125 meant as 125 %, i.e. 12 500 %).
MAX_PERCENT: Final = 1000
NO_CANDIDATE: Final = -1


def percent(factor: float) -> int:
    """The balance factor as a whole percentage (1.25 -> 125), checked for range."""
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise ValueError(f"balance factor must be a number, not {factor!r}")
    # NaN and infinities fail the range check before they reach round()
    if (
        not MIN_PERCENT - 1 < factor * 100 < MAX_PERCENT + 1
        or not MIN_PERCENT <= (pct := round(factor * 100)) <= MAX_PERCENT
    ):
        raise ValueError(
            f"balance factor must be between {MIN_PERCENT / 100:g} and "
            f"{MAX_PERCENT / 100:g} (a ratio to the mean, 1.25 = 125 %), "
            f"not {factor!r}"
        )
    return pct


def capacity(weight: int, total_inflight: int, total_weight: int, pct: int) -> int:
    """In-flight requests a backend of ``weight`` may hold, this request counted in the total."""
    if total_weight <= 0:
        return 1
    denominator = 100 * total_weight
    slots = (pct * (total_inflight + 1) * weight + denominator - 1) // denominator
    return slots if slots > 1 else 1


def within(inflight: int, weight: int, total_inflight: int, total_weight: int, pct: int) -> bool:
    """Whether one more request keeps the backend at or under its capacity."""
    return inflight < capacity(weight, total_inflight, total_weight, pct)


def choose(
    loads: Sequence[int], weights: Sequence[int], total_inflight: int, total_weight: int, pct: int
) -> int:
    """Index of the backend for this request among the key's usable backends in preference
    order, given as their in-flight counts ``loads`` and ``weights`` (parallel): the first
    within the bound, else the least loaded relative to its capacity (earliest on a tie);
    NO_CANDIDATE when there are none. Index 0 is the owner (no spill)."""
    best = NO_CANDIDATE
    # compared as best_load / best_cap > load / cap, cross-multiplied to stay in integers
    best_load = 0
    best_cap = 1
    for i in range(len(loads)):
        cap = capacity(weights[i], total_inflight, total_weight, pct)
        load = loads[i]
        if load < cap:
            return i
        if best == NO_CANDIDATE or load * best_cap < best_load * cap:
            best, best_load, best_cap = i, load, cap
    return best
