"""Opt-in bounded load (stickyproxy.routing.spill): HAProxy/Envoy hash-balance-factor."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stickyproxy.routing.ring import Member, Ring
from stickyproxy.routing.spill import NO_CANDIDATE, capacity, choose, percent, within


@dataclass
class B:
    """A simulated backend: what the data plane (inflight) and routing (weight) know."""

    inflight: int
    weight: int = 1


def pick(cands, total, total_weight, pct):
    return choose([c.inflight for c in cands], [c.weight for c in cands], total, total_weight, pct)


@pytest.mark.parametrize(
    "factor, pct",
    [
        (1.25, 125),
        (1, 100),
        (1.0, 100),
        (1.5, 150),
        (2, 200),
        (10, 1000),
        (1.256, 126),
    ],
)
def test_factor_as_a_percentage(factor, pct):
    assert percent(factor) == pct


@pytest.mark.parametrize(
    "bad", [0.99, 0.5, 0, -1.25, 10.01, 125, float("nan"), float("inf"), True, "1.25", None]
)
def test_factors_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match="balance factor"):
        percent(bad)


@pytest.mark.parametrize(
    "weight, total, total_weight, pct, expected",
    [
        (1, 0, 3, 125, 1),  # idle: ceil(1.25 * 1 / 3) = 1, and never fewer than one
        (1, 11, 3, 125, 5),  # ceil(1.25 * 12 / 3) = 5
        (1, 12, 3, 125, 6),  # ceil(1.25 * 13 / 3) = ceil(5.42)
        (1, 9, 3, 150, 5),  # exactly 1.5 * 10 / 3: no rounding up
        (1, 9, 3, 100, 4),  # factor 1: ceil(10 / 3)
        (2, 7, 4, 125, 5),  # weight 2 of 4: 1.25 * 8 * 2 / 4
        (1, 7, 4, 125, 3),  # weight 1 of 4: ceil(2.5)
        (3, 99, 3, 100, 100),  # the only backend: all of it
        (1, 5, 0, 125, 1),  # no usable weight: never zero
    ],
)
def test_capacity(weight, total, total_weight, pct, expected):
    assert capacity(weight, total, total_weight, pct) == expected


@pytest.mark.parametrize(
    "inflight, weight, total, total_weight, pct, expected",
    [
        (4, 1, 11, 3, 125, True),  # 4 + 1 <= 5
        (5, 1, 11, 3, 125, False),  # 5 + 1 > 5
        (0, 1, 0, 3, 125, True),  # an idle backend always takes one
        (1, 1, 1, 3, 125, False),  # capacity ceil(2.5/3) = 1, already holding it
        (3, 1, 9, 3, 100, True),
        (4, 1, 9, 3, 100, False),
    ],
)
def test_within(inflight, weight, total, total_weight, pct, expected):
    assert within(inflight, weight, total, total_weight, pct) is expected


@pytest.mark.parametrize(
    "loads, weights, total, total_weight, pct, expected",
    [
        ([3, 3, 3], [1, 1, 1], 9, 3, 125, 0),  # balanced: the owner
        ([5, 2, 2], [1, 1, 1], 9, 3, 125, 1),  # owner at capacity 5: the next one
        ([5, 5, 1], [1, 1, 1], 11, 3, 125, 2),  # capacity 5: first two full, the third
        ([4, 5, 2], [1, 1, 1], 11, 3, 125, 0),  # owner has room
        ([6, 6], [1, 1], 20, 3, 125, 0),  # a subset of the backends; capacity 9
        ([], [], 0, 3, 125, NO_CANDIDATE),
    ],
)
def test_choose_first_within_bound(loads, weights, total, total_weight, pct, expected):
    cands = [B(load, w) for load, w in zip(loads, weights)]
    assert pick(cands, total, total_weight, pct) == expected


@pytest.mark.parametrize(
    "loads, weights, expected",
    [
        # total 30 over weight 3 at 100 %: capacity ceil(31/3) = 11 per unit of weight; the
        # candidates given are all above it (the rest of the load is on backends not offered).
        ([12, 12], [1, 1], 0),  # tie: the owner keeps it
        ([14, 12], [1, 1], 1),  # the least loaded relative to capacity
        ([12, 14], [1, 1], 0),
        ([22, 12], [2, 1], 0),  # 22 / 21 < 12 / 11: relative to capacity, not absolute
        ([30, 12], [2, 1], 1),  # 30 / 21 > 12 / 11
        ([13, 12, 12], [1, 1, 1], 1),  # first of the equal least
    ],
)
def test_every_candidate_above_the_bound_goes_to_the_least_loaded(loads, weights, expected):
    cands = [B(load, w) for load, w in zip(loads, weights)]
    assert all(not within(c.inflight, c.weight, 30, 3, 100) for c in cands)
    assert pick(cands, 30, 3, 100) == expected


@settings(max_examples=300, deadline=None)
@given(
    loads=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 5)), min_size=1, max_size=8),
    pct=st.integers(100, 400),
    rotate=st.integers(0, 7),
)
def test_some_usable_backend_is_always_within_the_bound(loads, pct, rotate):
    """Candidates = every usable backend, total = their in-flight sum: never all full."""
    cands = [B(load, w) for load, w in loads]
    r = rotate % len(cands)
    cands = cands[r:] + cands[:r]
    total = sum(c.inflight for c in cands)
    total_weight = sum(c.weight for c in cands)
    i = pick(cands, total, total_weight, pct)
    assert 0 <= i < len(cands)
    c = cands[i]
    assert within(c.inflight, c.weight, total, total_weight, pct)
    assert all(not within(x.inflight, x.weight, total, total_weight, pct) for x in cands[:i])


@pytest.mark.parametrize("factor", [1.0, 1.25, 1.5, 2.0])
def test_no_backend_exceeds_factor_times_the_mean(factor):
    """Requests arrive and stay in flight (a burst), Zipf-skewed keys: with spill every
    backend stays within its capacity at every step; without it the hottest owner does not."""
    pct = percent(factor)
    ring = Ring([Member("a"), Member("b"), Member("c")])
    states = {m.id: B(0) for m in ring.members}
    plain = {m.id: 0 for m in ring.members}
    rng = random.Random(7)
    # a skewed burst: half the requests come from three hot users who share an owner
    hot = [k for k in (f"hot-{i}" for i in range(100)) if ring.owner(k) == "a"][:3]
    keys = [
        rng.choice(hot) if rng.random() < 0.5 else f"user-{rng.randrange(10**6)}"
        for _ in range(3000)
    ]
    spilled = 0
    for key in keys:
        total = sum(s.inflight for s in states.values())
        cands = [states[b] for b in ring.preference(key)]
        i = pick(cands, total, 3, pct)
        spilled += i > 0
        cands[i].inflight += 1
        assert cands[i].inflight <= capacity(1, total, 3, pct)
        plain[ring.owner(key)] += 1
    n = len(keys)
    assert max(s.inflight for s in states.values()) <= capacity(1, n - 1, 3, pct)
    assert max(plain.values()) > capacity(1, n - 1, 3, percent(1.5))  # the skew is real
    assert spilled > 0


def test_parallel_sequences_of_any_kind():
    assert choose((5, 2, 2), (1, 1, 1), 9, 3, 125) == 1
    assert choose(range(5, 8), [1] * 3, 18, 3, 100) == 0
