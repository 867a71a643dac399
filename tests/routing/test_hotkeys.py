"""Hot users (stickyproxy.routing.hotkeys): a bounded frequent-items sketch, mergeable."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stickyproxy.routing import hotkeys
from stickyproxy.routing.hotkeys import FORMAT, HotKey, HotKeys
from stickyproxy.routing.router import key_digest

from .zipf import zipf_keys

STREAM = zipf_keys(users=50_000, count=200_000, s=1.1, seed=3)
TRUTH = Counter(STREAM)
TRUE_TOP10 = [k for k, _ in TRUTH.most_common(10)]


def count(h: HotKeys, key: str) -> None:
    """One sampled request of ``key``, labelled as the proxy labels it."""
    h.add(key if h.raw else key_digest(key), h.sample_every)


def sketch_of(keys, max_keys=1024, sample_every=1, raw=True):
    """The sketch of ``keys`` sampled one request in ``sample_every``, as Router.count_key
    picks them (tests/routing/test_routing_quality.py tests that countdown)."""
    h = HotKeys(max_keys, sample_every, raw)
    for i, k in enumerate(keys, 1):
        if i % sample_every == 0:
            count(h, k)
    return h


def test_the_stream_is_skewed_with_a_clear_top_10():
    counts = [c for _, c in TRUTH.most_common(11)]
    assert counts[0] > 0.05 * len(STREAM)
    assert counts[9] > counts[10]  # a well-defined top 10


@pytest.mark.parametrize(
    "adds, expected_counts, offset",
    [
        # max_keys 4: the fifth distinct key triggers a purge of the median count
        ([("a", 5), ("b", 3), ("c", 2), ("d", 1)], {"a": 5, "b": 3, "c": 2, "d": 1}, 0),
        ([("a", 5), ("b", 3), ("c", 2), ("d", 1), ("e", 1)], {"a": 3, "b": 1}, 2),
        ([("a", 5), ("b", 3), ("c", 2), ("d", 1), ("e", 4)], {"a": 2, "e": 1}, 3),
        ([("a", 1), ("a", 1), ("b", 1)], {"a": 2, "b": 1}, 0),
    ],
)
def test_purge_subtracts_the_median_and_drops_what_reaches_zero(adds, expected_counts, offset):
    h = HotKeys(4, 1, raw=True)
    for label, weight in adds:
        h.add(label, weight)
    assert {e.key: e.requests for e in h.top(10)} == expected_counts
    assert h.offset == offset
    assert h.total == sum(w for _, w in adds)


def test_true_top_10_is_found_in_order_on_a_zipf_stream():
    h = sketch_of(STREAM)
    assert [e.key for e in h.top(10)] == TRUE_TOP10
    assert h.offset > 0  # purges happened: the test exercises them


def test_counts_are_bounded_by_the_offset_and_the_offset_by_total():
    h = sketch_of(STREAM, max_keys=256)
    assert h.offset <= 2 * h.total / 256
    tracked = {e.key: e.requests for e in h.top(256)}
    for key, true in TRUTH.items():
        c = tracked.get(key, 0)
        assert c <= true <= c + h.offset
    for e in h.top(10):
        assert e.upper == e.requests + h.offset
        assert e.share == pytest.approx(e.requests / len(STREAM))


def test_size_never_exceeds_max_keys():
    h = HotKeys(64, 1, raw=True)
    for i in range(20_000):
        count(h, f"once-{i}")  # every key new: the worst case for the sketch
        assert len(h) <= 64
    assert h.total == 20_000


def test_sampled_sketch_still_finds_the_hottest_users():
    h = sketch_of(STREAM, sample_every=16)
    assert h.total == len(STREAM) // 16 * 16
    top = [e.key for e in h.top(10)]
    assert top[:3] == TRUE_TOP10[:3]
    assert set(top) <= {k for k, _ in TRUTH.most_common(20)}
    for e in h.top(3):
        assert e.share == pytest.approx(TRUTH[e.key] / len(STREAM), rel=0.1)


@pytest.mark.parametrize("key", ["alice", "", "é", "user-1", "x" * 500])
def test_tags_are_the_access_logs(key):
    assert hotkeys.key_digest(key) == key_digest(key)


def test_keys_are_hashed_unless_raw():
    hashed = HotKeys(16, 1)
    raw = HotKeys(16, 1, raw=True)
    for h in (hashed, raw):
        for k in ("alice", "alice", "bob"):
            count(h, k)
    assert hashed.top(1)[0].key == key_digest("alice")
    assert "alice" not in json.dumps(hashed.to_data())
    assert raw.top(1)[0].key == "alice"
    assert hashed.estimate("alice") == raw.estimate("alice") == (2, 2)
    assert hashed.estimate("carol") == (0, 0)


def test_merge_of_worker_sketches_matches_one_sketch_over_all_requests():
    workers = [HotKeys(1024, 1) for _ in range(3)]
    for i, k in enumerate(STREAM):  # round robin, as connections land on workers
        count(workers[i % 3], k)
    merged = HotKeys(1024, 1)
    for w in workers:
        merged.merge(w)
    assert merged.total == len(STREAM)
    assert [e.key for e in merged.top(10)] == [key_digest(k) for k in TRUE_TOP10]
    assert merged.offset <= 2 * merged.total / 1024
    assert len(merged) <= 1024
    by_label = {key_digest(k): c for k, c in TRUTH.items()}
    for e in merged.top(1024):
        assert e.requests <= by_label[e.key] <= e.upper
    assert workers[0].total == len(STREAM[0::3])  # merge leaves the others alone


def test_merge_adds_counts_and_offsets_exactly():
    a, b = HotKeys(4, 1, raw=True), HotKeys(4, 1, raw=True)
    for label, w in [("x", 5), ("y", 2)]:
        a.add(label, w)
    for label, w in [("x", 1), ("z", 3)]:
        b.add(label, w)
    a.merge(b)
    assert {e.key: e.requests for e in a.top(10)} == {"x": 6, "y": 2, "z": 3}
    assert a.total == 11 and a.offset == 0


def test_merge_refuses_raw_with_hashed():
    with pytest.raises(ValueError, match="raw keys with one of hashed"):
        HotKeys(8, 1, raw=True).merge(HotKeys(8, 1, raw=False))


def test_serialised_sketch_round_trips_through_json():
    h = sketch_of(STREAM[:50_000], max_keys=128, sample_every=4, raw=False)
    data = json.loads(json.dumps(h.to_data()))
    back = HotKeys.from_data(data)
    assert back.top(128) == h.top(128)
    assert (back.total, back.offset, back.sample_every, back.max_keys, back.raw) == (
        h.total,
        h.offset,
        4,
        128,
        False,
    )
    assert data["format"] == FORMAT
    merged = HotKeys(128, 4)
    merged.merge(HotKeys.from_data(data))
    assert merged.top(5) == h.top(5)


def _good():
    return {
        "format": FORMAT,
        "max_keys": 8,
        "sample_every": 2,
        "raw": False,
        "total": 10,
        "offset": 1,
        "items": [["aa", 4], ["bb", 2]],
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "other/1"}, r"w\.format: expected"),
        ({"max_keys": -1}, r"w\.max_keys: not a non-negative integer"),
        ({"max_keys": 2}, r"w: max_keys must be an integer from 4"),
        ({"sample_every": True}, r"w\.sample_every: not a non-negative integer"),
        ({"total": "10"}, r"w\.total: not a non-negative integer"),
        ({"raw": "no"}, r"w\.raw: not a boolean"),
        ({"items": {"aa": 4}}, r"w\.items: not a list of at most 8 pairs"),
        ({"items": [["k", 1]] * 9}, r"w\.items: not a list of at most 8 pairs"),
        ({"items": [["aa", 4], ["aa", 2]]}, r"w\.items\[1\]: not a new"),
        ({"items": [["aa", 0]]}, r"w\.items\[0\]: not a new"),
        ({"items": [[1, 2]]}, r"w\.items\[0\]: not a new"),
        ({"items": [["aa", 11]]}, r"w\.total: less than the sum"),
    ],
)
def test_bad_serialised_sketch_names_the_field(change, message):
    data = {**_good(), **change}
    with pytest.raises(ValueError, match=message):
        HotKeys.from_data(data, where="w")


def test_non_object_is_refused():
    with pytest.raises(ValueError, match="hotkeys: not an object"):
        HotKeys.from_data([1, 2])


@pytest.mark.parametrize("max_keys, sample_every", [(3, 1), (1 << 21, 1), (8, 0), (8, 1.5)])
def test_bad_parameters_are_refused(max_keys, sample_every):
    with pytest.raises(ValueError):
        HotKeys(max_keys, sample_every)


def test_top_is_ordered_and_ties_break_by_key():
    h = HotKeys(16, 1, raw=True)
    for label, w in [("b", 2), ("a", 2), ("c", 5)]:
        h.add(label, w)
    assert h.top(3) == [
        HotKey("c", 5, 5, 5 / 9),
        HotKey("a", 2, 2, 2 / 9),
        HotKey("b", 2, 2, 2 / 9),
    ]
    assert h.top(0) == [] and h.top(-1) == []
    h.clear()
    assert h.top(3) == [] and h.total == 0 and len(h) == 0
