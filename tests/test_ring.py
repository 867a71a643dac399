"""Ring invariants P1–P3 (DESIGN.md §2) on real uhashring continua."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stickyproxy.routing.ring import Member, Ring, fingerprint, moved_share

KEYS = [f"user-{i}" for i in range(100_000)]
SMALL_KEYS = KEYS[:20_000]


def ring(*ids, vnodes=160, **weights):
    return Ring([Member(i, weights.get(i.replace("-", "_"), 1)) for i in ids], vnodes)


def test_owner_is_first_of_preference_list():
    r = ring("a", "b", "c", "d")
    for k in KEYS[:2000]:
        pref = r.preference(k)
        assert pref[0] == r.owner(k)
        assert sorted(pref) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "members",
    [
        [Member("a"), Member("b"), Member("c")],
        [Member("app-1", 3), Member("app-2", 1), Member("app-3", 7), Member("x", 2)],
        [Member("solo")],
        [],
    ],
)
def test_owner_is_uhashrings_get_node_key_for_key(members):
    """The direct lookup computes exactly what uhashring's get_node returns (P2 rests on
    it), for plain, weighted, single and empty rings, and for non-ASCII keys."""
    from uhashring import HashRing

    r = Ring(members, 40)
    ref = HashRing(nodes={m.id: {"weight": m.weight, "vnodes": 40} for m in members}, vnodes=40)
    for k in KEYS[:30_000] + ["", "ü-σ-用户", "x" * 300]:
        assert r.owner(k) == ref.get_node(k), k


def test_owner_cache_is_bounded_and_never_changes_an_answer(monkeypatch):
    import stickyproxy.routing.ring as ring_module

    if not ring_module.__file__.endswith(".py"):
        pytest.skip("the compiled module reads its constant at build time")
    monkeypatch.setattr(ring_module, "OWNER_CACHE_SIZE", 100)
    r = ring("a", "b", "c")
    first = [r.owner(k) for k in KEYS[:1000]]
    assert len(r._cache) <= 100
    assert [r.owner(k) for k in KEYS[:1000]] == first  # through a cache that refilled
    assert [r.owner(k) for k in KEYS[950:1000]] == first[950:]  # straight from the cache


def test_removing_one_backend_moves_only_its_keys():
    full = ring("a", "b", "c", "d", "e")
    less = ring("a", "b", "d", "e")
    moved_between_survivors = 0
    moved = 0
    for k in KEYS:
        before, after = full.owner(k), less.owner(k)
        if before != after:
            moved += 1
            if before != "c":
                moved_between_survivors += 1
    assert moved_between_survivors == 0
    assert 0.12 < moved / len(KEYS) < 0.28  # ≈ 1/5


def test_adding_one_backend_moves_about_one_over_n_plus_one_all_onto_it():
    before, after = ring("a", "b", "c", "d"), ring("a", "b", "c", "d", "e")
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == "e" for k in moved)
    assert 0.12 < len(moved) / len(KEYS) < 0.28  # ≈ 1/5


def test_skipping_an_unusable_backend_equals_removing_it():
    full = ring("a", "b", "c", "d", "e")
    for down in ("a", "c"):
        removed = Ring([m for m in full.members if m.id != down], full.vnodes)
        usable = {m.id for m in full.members} - {down}
        mismatches = sum(1 for k in KEYS if full.pick(k, usable).backend != removed.owner(k))
        assert mismatches == 0


def test_pick_reports_primary_and_failover():
    r = ring("a", "b", "c")
    k = "alice"
    pref = r.preference(k)
    p = r.pick(k, set(pref))
    assert (p.backend, p.primary, p.owner) == (pref[0], True, pref[0])
    p = r.pick(k, lambda b: b != pref[0])
    assert (p.backend, p.primary, p.owner) == (pref[1], False, pref[0])
    p = r.pick(k, set())
    assert (p.backend, p.primary) == (None, False)
    assert r.pick(k).backend == pref[0]


def test_two_rings_built_separately_agree_whatever_the_member_order():
    a = Ring([Member("x"), Member("y", 2), Member("z")])
    b = Ring([Member("z"), Member("x"), Member("y", 2)])
    assert all(a.owner(k) == b.owner(k) for k in KEYS)
    assert a.fingerprint == b.fingerprint


def test_weights_are_respected_in_proportion():
    r = Ring([Member("a", 1), Member("b", 2), Member("c", 1)])
    counts = {"a": 0, "b": 0, "c": 0}
    for k in KEYS:
        counts[r.owner(k)] += 1
    assert 0.44 < counts["b"] / len(KEYS) < 0.56
    share = r.key_share()
    assert abs(sum(share.values()) - 1.0) < 1e-9
    assert abs(share["b"] - counts["b"] / len(KEYS)) < 0.01


def test_reweighting_moves_keys_only_onto_the_heavier_backend():
    before = Ring([Member("a"), Member("b"), Member("c")])
    after = Ring([Member("a"), Member("b", 2), Member("c")])
    for k in SMALL_KEYS:
        o1, o2 = before.owner(k), after.owner(k)
        if o1 != o2:
            assert o2 == "b"


def test_fingerprint_changes_with_ids_weights_and_vnodes():
    base = fingerprint([Member("a"), Member("b")], 160)
    assert fingerprint([Member("b"), Member("a")], 160) == base
    assert fingerprint([Member("a"), Member("b", 2)], 160) != base
    assert fingerprint([Member("a"), Member("c")], 160) != base
    assert fingerprint([Member("a"), Member("b")], 100) != base
    assert len(base) == 12


def test_moved_share_matches_sampling():
    old, new = ring("a", "b", "c"), ring("a", "b", "c", "d")
    flows = moved_share(old, new)
    assert set(flows) <= {("a", "d"), ("b", "d"), ("c", "d")}
    sampled = sum(1 for k in KEYS if old.owner(k) != new.owner(k)) / len(KEYS)
    assert abs(sum(flows.values()) - sampled) < 0.01
    assert moved_share(old, old) == {}


def test_invalid_members_are_refused():
    with pytest.raises(ValueError):
        Ring([Member("a"), Member("a")])
    with pytest.raises(ValueError):
        Ring([Member("a", 0)])
    empty = Ring([])
    assert empty.owner("k") is None and empty.preference("k") == []
    assert empty.pick("k").backend is None


_SUBPROCESS = """
import json, sys
from stickyproxy.routing.ring import Member, Ring
r = Ring([Member("app-1"), Member("app-2", 2), Member("app-3")])
print(json.dumps([r.owner(f"user-{i}") for i in range(5000)] + [r.fingerprint]))
"""


def test_mapping_is_the_same_under_different_hash_seeds():
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        outs.add(out)
    assert len(outs) == 1
    r = Ring([Member("app-1"), Member("app-2", 2), Member("app-3")])
    assert json.loads(outs.pop()) == [r.owner(f"user-{i}") for i in range(5000)] + [r.fingerprint]


ids = st.lists(
    st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=2, max_size=7, unique=True
)


@settings(max_examples=25, deadline=None)
@given(ids, st.data())
def test_property_removal_moves_only_the_removed_backends_keys(members, data):
    victim = data.draw(st.sampled_from(members))
    full = Ring([Member(m) for m in members], vnodes=40)
    less = Ring([Member(m) for m in members if m != victim], vnodes=40)
    for k in KEYS[:3000]:
        if full.owner(k) != victim:
            assert less.owner(k) == full.owner(k)
        else:
            assert less.owner(k) == full.pick(k, lambda b: b != victim).backend
