"""Table tests of the pure pieces: no I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stickyproxy.context.breaker import BreakerState, CircuitBreaker
from stickyproxy.context.buffer import PendingWrite, PendingWrites
from stickyproxy.context.connection import parse_redis_url
from stickyproxy.context.errors import ConfigError, RecordMismatch, SerializationError
from stickyproxy.context.locks import UserLocks
from stickyproxy.context.lru import LruCache
from stickyproxy.context.record import (
    ProtocolError,
    WriteOutcome,
    parse_acquire,
    parse_delete,
    parse_snapshot,
    parse_takeover,
    parse_write,
)
from stickyproxy.context.retry import Op, backoff_delay, should_rerun_handler, should_retry_redis
from stickyproxy.context.scripts import record_key
from stickyproxy.context.serializers import JsonSerializer
from stickyproxy.context.settings import StoreSettings, parse_duration

# --- breaker -------------------------------------------------------------------------------
# Each row: a script of (time, action) and the expected (allowed?, state) after each step.
# Actions: "allow", "ok", "fail", "abandon".
BREAKER_TABLE: list[tuple[str, list[tuple[float, str, Any]]]] = [
    (
        "stays closed under threshold",
        [
            (0, "fail", BreakerState.CLOSED),
            (0, "fail", BreakerState.CLOSED),
            (0, "allow", True),
        ],
    ),
    (
        "opens at threshold and refuses",
        [
            (0, "fail", BreakerState.CLOSED),
            (0, "fail", BreakerState.CLOSED),
            (0, "fail", BreakerState.OPEN),
            (0.5, "allow", False),
            (0.99, "allow", False),
        ],
    ),
    (
        "success resets the count",
        [
            (0, "fail", BreakerState.CLOSED),
            (0, "fail", BreakerState.CLOSED),
            (0, "ok", BreakerState.CLOSED),
            (0, "fail", BreakerState.CLOSED),
            (0, "fail", BreakerState.CLOSED),
            (0, "allow", True),
        ],
    ),
    (
        "half-open admits exactly one probe",
        [
            (0, "fail", None),
            (0, "fail", None),
            (0, "fail", BreakerState.OPEN),
            (1.0, "allow", True),
            (1.0, "state", BreakerState.HALF_OPEN),
            (1.0, "allow", False),
            (1.1, "allow", False),
        ],
    ),
    (
        "probe success closes",
        [
            (0, "fail", None),
            (0, "fail", None),
            (0, "fail", None),
            (1.0, "allow", True),
            (1.0, "ok", BreakerState.CLOSED),
            (1.0, "allow", True),
            (1.0, "allow", True),
        ],
    ),
    (
        "probe failure reopens for another full delay",
        [
            (0, "fail", None),
            (0, "fail", None),
            (0, "fail", None),
            (1.0, "allow", True),
            (1.0, "fail", BreakerState.OPEN),
            (1.5, "allow", False),
            (2.0, "allow", True),
        ],
    ),
    (
        "abandoned probe frees the slot",
        [
            (0, "fail", None),
            (0, "fail", None),
            (0, "fail", None),
            (1.0, "allow", True),
            (1.0, "abandon", BreakerState.HALF_OPEN),
            (1.0, "allow", True),
        ],
    ),
]


@pytest.mark.parametrize(("name", "steps"), BREAKER_TABLE, ids=[row[0] for row in BREAKER_TABLE])
def test_breaker(name: str, steps: list[tuple[float, str, Any]]) -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_after=1.0)
    for now, action, expected in steps:
        if action == "allow":
            assert breaker.allow(now) is expected, (name, now)
            continue
        if action == "ok":
            breaker.record_success()
        elif action == "fail":
            breaker.record_failure(now)
        elif action == "abandon":
            breaker.abandon()
        if expected is not None:
            assert breaker.state is expected, (name, now, action)


@pytest.mark.parametrize(("threshold", "reset"), [(0, 1.0), (1, 0.0)])
def test_breaker_rejects_bad_settings(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, reset)


# --- LRU -----------------------------------------------------------------------------------
# (max_entries, max_bytes, puts [(key, size)], gets, expected keys oldest→newest, evicted, bytes)
LRU_TABLE = [
    (
        "entry bound evicts oldest",
        2,
        1000,
        [("a", 1), ("b", 1), ("c", 1)],
        [],
        ["b", "c"],
        ["a"],
        2,
    ),
    ("get refreshes recency", 2, 1000, [("a", 1), ("b", 1)], ["a"], ["b", "a"], [], 2),
    (
        "byte bound evicts until fits",
        10,
        10,
        [("a", 4), ("b", 4), ("c", 4)],
        [],
        ["b", "c"],
        ["a"],
        8,
    ),
    (
        "byte bound evicts several",
        10,
        10,
        [("a", 3), ("b", 3), ("c", 3), ("d", 9)],
        [],
        ["d"],
        ["a", "b", "c"],
        9,
    ),
    ("oversize value is not stored", 10, 10, [("a", 3), ("big", 11)], [], ["a"], ["big"], 3),
    ("replace adjusts bytes", 10, 10, [("a", 3), ("a", 7)], [], ["a"], [], 7),
]


@pytest.mark.parametrize(
    ("name", "max_entries", "max_bytes", "puts", "gets", "expected", "evicted", "total"),
    LRU_TABLE,
    ids=[row[0] for row in LRU_TABLE],
)
def test_lru(
    name: str,
    max_entries: int,
    max_bytes: int,
    puts: list[tuple[str, int]],
    gets: list[str],
    expected: list[str],
    evicted: list[str],
    total: int,
) -> None:
    cache: LruCache[str] = LruCache(max_entries, max_bytes)
    all_evicted: list[str] = []
    for key, size in puts:
        all_evicted += cache.put(key, key.upper(), size)
    for key in gets:
        assert cache.get(key) == key.upper()
    assert list(cache) == expected
    assert all_evicted == evicted
    assert cache.bytes == total
    assert len(cache) <= max_entries and cache.bytes <= max_bytes


def test_lru_pop_and_peek() -> None:
    cache: LruCache[int] = LruCache(3, 100)
    cache.put("a", 1, 10)
    cache.put("b", 2, 10)
    assert cache.peek("a") == 1 and list(cache) == ["a", "b"]
    assert cache.pop("a") == 1 and cache.pop("a") is None
    assert cache.bytes == 10


# --- retry decisions -----------------------------------------------------------------------
REDIS_RETRY_TABLE = [
    (Op.READ, 1, 0.1, True),
    (Op.READ, 2, 0.1, False),
    (Op.READ, 1, 0.0, False),
    (Op.TOUCH, 1, 0.1, True),
    (Op.ACQUIRE, 1, 0.1, False),
    (Op.WRITE, 1, 0.1, False),
    (Op.DELETE, 1, 0.1, False),
]


@pytest.mark.parametrize(("op", "attempt", "remaining", "expected"), REDIS_RETRY_TABLE)
def test_should_retry_redis(op: Op, attempt: int, remaining: float, expected: bool) -> None:
    assert should_retry_redis(op, attempt, remaining) is expected


RERUN_TABLE = [
    ("GET", 1, 3, True),
    ("get", 2, 3, True),
    ("GET", 3, 3, False),
    ("HEAD", 1, 3, True),
    ("OPTIONS", 1, 3, True),
    ("PUT", 1, 3, True),
    ("DELETE", 1, 3, True),
    ("POST", 1, 3, False),
    ("PATCH", 1, 3, False),
    ("GET", 1, 1, False),
]


@pytest.mark.parametrize(("method", "attempt", "max_attempts", "expected"), RERUN_TABLE)
def test_should_rerun_handler(method: str, attempt: int, max_attempts: int, expected: bool) -> None:
    assert should_rerun_handler(method, attempt, max_attempts) is expected


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.0), (1, 0.05), (2, 0.1), (3, 0.2), (6, 1.6), (7, 2.0), (100, 2.0)],
)
def test_backoff(attempt: int, expected: float) -> None:
    assert backoff_delay(attempt, 0.05, 2.0) == pytest.approx(expected)


# --- pending writes ------------------------------------------------------------------------
def test_pending_writes_bounded_latest_per_user() -> None:
    buf = PendingWrites(2)
    assert buf.put("a", PendingWrite(1, b"1"))
    assert buf.put("a", PendingWrite(1, b"2"))
    assert buf.put("b", PendingWrite(1, b"x"))
    assert not buf.put("c", PendingWrite(1, b"y"))
    assert buf.users() == ["a", "b"] and buf.get("a") == PendingWrite(1, b"2")
    popped = buf.pop("a")
    assert popped is not None
    assert buf.put("c", PendingWrite(1, b"y"))
    # An acknowledged change whose flush failed goes back even though "c" took its room: the
    # bound is exceeded by the flushes in flight, never by dropping an acknowledged change.
    assert buf.restore("a", popped)
    assert buf.users() == ["a", "b", "c"] and len(buf) == 3
    assert not buf.put("d", PendingWrite(1, b"z"))  # new users still refused while over the bound
    assert not buf.restore("c", PendingWrite(1, b"old"))  # a newer one is there
    assert buf.get("c") == PendingWrite(1, b"y")


# --- URLs ----------------------------------------------------------------------------------
URL_TABLE: list[tuple[str, bool, dict[str, Any]]] = [
    ("redis://h:1/0", False, {"kind": "single", "ssl": False}),
    ("rediss://h:1/0", False, {"kind": "single", "ssl": True}),
    ("unix:///tmp/r.sock", False, {"kind": "single"}),
    ("redis://h1:7000", True, {"kind": "cluster", "hosts": (("h1", 7000),)}),
    (
        "redis+cluster://a:1,b:2,c",
        False,
        {"kind": "cluster", "hosts": (("a", 1), ("b", 2), ("c", 6379))},
    ),
    (
        "rediss+cluster://u:p%40ss@a:1",
        False,
        {"kind": "cluster", "ssl": True, "username": "u", "password": "p@ss"},
    ),
    (
        "redis+sentinel://s1:5000,s2/mymaster",
        False,
        {
            "kind": "sentinel",
            "hosts": (("s1", 5000), ("s2", 26379)),
            "service": "mymaster",
            "db": 0,
        },
    ),
    (
        "redis+sentinel://:pw@s1:5000/svc/3?sentinel_password=x",
        False,
        {
            "kind": "sentinel",
            "password": "pw",
            "username": None,
            "db": 3,
            "options": {"sentinel_password": "x"},
        },
    ),
    ("redis+sentinel://[::1]:5000/svc", False, {"kind": "sentinel", "hosts": (("::1", 5000),)}),
]


@pytest.mark.parametrize(("url", "cluster", "expected"), URL_TABLE)
def test_parse_redis_url(url: str, cluster: bool, expected: dict[str, Any]) -> None:
    target = parse_redis_url(url, cluster=cluster)
    for attr, value in expected.items():
        assert getattr(target, attr) == value, attr


@pytest.mark.parametrize(
    "url",
    [
        "h:1",
        "http://h",
        "redis+sentinel://s1:5000",
        "redis+sentinel://s1/svc/x",
        "redis+cluster://a:1/2",
        "redis+cluster://a:99999",
        "redis+cluster://",
    ],
)
def test_parse_redis_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_redis_url(url)


# --- records -------------------------------------------------------------------------------
def test_parse_acquire() -> None:
    got = parse_acquire([1, b"alice", 3, b'{"a":1}', b"nodeA"], "alice")
    assert (got.epoch, got.payload, got.previous_owner) == (3, b'{"a":1}', "nodeA")
    fresh = parse_acquire([1, b"alice", 1, None, None], "alice")
    assert fresh.payload is None and fresh.previous_owner is None


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ([0, b"mallory"], RecordMismatch),
        ([1, b"mallory", 3, b"{}", None], RecordMismatch),
        ([7], ProtocolError),
        (b"OK", ProtocolError),
    ],
)
def test_parse_acquire_refuses(reply: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_acquire(reply, "alice")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ([1], WriteOutcome.COMMITTED),
        ([0, b"7", b"B"], WriteOutcome.TAKEN_OVER),  # another owner (any node id) acquired since
        ([0, b"7", b""], WriteOutcome.DELETED),  # tombstone
        ([0, None, None], WriteOutcome.LOST),  # no record: expired or Redis lost it
        ([0], WriteOutcome.TAKEN_OVER),  # older script reply: a fence, reason unknown
        ([0, b"9", b"alice-node"], WriteOutcome.OWN_LATER),  # this process re-acquired since
        ([-1, b"mallory"], RecordMismatch),
    ],
)
def test_parse_write(reply: list[Any], expected: Any) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            parse_write(reply, "alice", "alice-node")
    else:
        assert parse_write(reply, "alice", "alice-node") is expected


def test_parse_snapshot_and_delete() -> None:
    snap = parse_snapshot([b"alice", b"4", b"A", b"{}"], "alice")
    assert snap.owned_by("A", 4) and not snap.owned_by("A", 3) and not snap.owned_by("B", 4)
    assert parse_snapshot([None, None, None, None], "alice").epoch is None
    with pytest.raises(RecordMismatch):
        parse_snapshot([b"bob", b"4", b"A", b"{}"], "alice")
    assert parse_delete([1, 9], "alice") == 9
    with pytest.raises(RecordMismatch):
        parse_delete([0, b"bob"], "alice")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"5\nnodeA\nalice", ("alice", 5, "nodeA")),
        (b"5\n\nalice", ("alice", 5, "")),
        (b"5\nnodeA\nline\nbreak", ("line\nbreak", 5, "nodeA")),
        (b"x\nnodeA\nalice", None),
        (b"5\nnodeA", None),
        (123, None),
    ],
)
def test_parse_takeover(raw: Any, expected: tuple[str, int, str] | None) -> None:
    got = parse_takeover(raw)
    assert (None if got is None else (got.user, got.epoch, got.owner)) == expected


def test_record_key_hash_tag() -> None:
    assert record_key("ns", "alice") == "ns:{alice}"


# --- settings and serializer ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        (3, 3.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value, name="x") == seconds


@pytest.mark.parametrize("value", ["", "1y", "-1s", 0, True, None, "0s"])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ConfigError):
        parse_duration(value, name="x")


@pytest.mark.parametrize(
    "overrides",
    [
        {"node_id": ""},
        {"node_id": "a\nb"},
        {"namespace": "a{b"},
        {"mode": "later"},
        {"on_redis_down": "ignore"},
        {"max_entries": 0},
        {"buffer_max": -1},
        {"idle_ttl": 0.5},
    ],
)
def test_settings_reject(overrides: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"redis_url": "redis://h", "node_id": "n", **overrides}
    with pytest.raises(ConfigError):
        StoreSettings(**kwargs)


def test_json_serializer() -> None:
    s = JsonSerializer()
    assert s.dumps({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()
    assert s.loads(s.dumps({"x": {"y": None}})) == {"x": {"y": None}}
    for bad in (b"[1]", b"nope", b"\xff"):
        with pytest.raises(SerializationError):
            s.loads(bad)
    with pytest.raises(SerializationError):
        s.dumps({"x": object()})


# --- per-user locks ------------------------------------------------------------------------
async def test_user_locks_serialise_and_do_not_leak() -> None:
    locks = UserLocks()
    order: list[str] = []

    async def worker(name: str, user: str) -> None:
        async with locks.hold(user):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    await asyncio.gather(worker("a", "u"), worker("b", "u"), worker("c", "v"))
    assert order.index("a-") < order.index("b+") or order.index("b-") < order.index("a+")
    assert len(locks) == 0

    async def failing() -> None:
        async with locks.hold("w"):
            raise RuntimeError

    with pytest.raises(RuntimeError):
        await failing()
    assert len(locks) == 0 and locks.peek("w") is None


# --- sentinel events --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("channel", "text", "service"),
    [
        ("+switch-master", "ctx 127.0.0.1 6379 127.0.0.1 6380", "ctx"),
        ("+switch-master", "garbage", None),
        (
            "+failover-state-send-slaveof-noone",
            "slave 127.0.0.1:6380 127.0.0.1 6380 @ ctx 127.0.0.1 6379",
            "ctx",
        ),
        ("+failover-state-send-slaveof-noone", "slave 127.0.0.1:6380 127.0.0.1 6380 @", None),
        ("-failover-abort-no-good-slave", "master ctx 127.0.0.1 6379", "ctx"),
        ("+sdown", "master ctx 127.0.0.1 6379", None),
    ],
)
def test_sentinel_event_service(channel: str, text: str, service: str | None) -> None:
    from stickyproxy.context.connection import sentinel_event_service

    assert sentinel_event_service(channel, text) == service


def test_wait_replicas_defaults_by_topology() -> None:
    from stickyproxy.context import ConfigError, ContextStore

    assert ContextStore("redis://127.0.0.1:1/0").settings.wait_replicas == 0
    assert ContextStore("redis+sentinel://127.0.0.1:1/m").settings.wait_replicas == 0
    assert (
        ContextStore("redis+sentinel://127.0.0.1:1/m", wait_replicas=1).settings.wait_replicas == 1
    )
    assert ContextStore("redis+cluster://127.0.0.1:1").settings.wait_replicas == 0
    with pytest.raises(ConfigError, match="wait_replicas"):
        ContextStore("redis+cluster://127.0.0.1:1", wait_replicas=1)
    with pytest.raises(ConfigError, match="wait_replicas"):
        ContextStore("redis://127.0.0.1:1/0", wait_replicas=-1)
