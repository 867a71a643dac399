"""Redis faults (C5) and connection hygiene, against real servers: kill/restart, CLIENT PAUSE,
listener drops, a relay that cuts or delays connections, cancellation mid-flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stickyproxy.context import BreakerState, ContextStore, StoreUnavailable
from stickyproxy.context.connection import build_clients, parse_redis_url
from stickyproxy.context.scripts import record_key

from .conftest import RedisServer, TcpProxy, eventually

Stores = Callable[..., Any]
# Slack over the configured Redis timeout for scheduling on a loaded test machine.
SLACK = 0.25


def counter(metric: Any) -> float:
    return metric._value.get()


@pytest.fixture
def durable_server(tmp_path: Path) -> Any:
    """A server whose data survives SIGKILL (AOF fsync on every write), to restart with data."""
    server = RedisServer(
        tmp_path / "durable", extra=["--appendonly", "yes", "--appendfsync", "always"]
    )
    server.start()
    yield server
    server.kill()


def relayed_since(proxy: TcpProxy, seen: int) -> Callable[[], bool]:
    """Predicate: the relay has passed a request on since it had seen ``seen``."""
    return lambda: proxy.requests_seen > seen


async def timed(coro: Any) -> tuple[float, Any]:
    start = time.monotonic()
    try:
        result: Any = await coro
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = exc
    return time.monotonic() - start, result


async def test_redis_killed_reads_continue_writes_fail_fast_then_recover(
    durable_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores(
        "A",
        url=durable_server.url,
        redis_timeout="200ms",
        breaker_failures=3,
        breaker_reset="300ms",
    )
    users = [f"u{i}" for i in range(5)]
    for i, user in enumerate(users):
        async with a.edit(user) as ctx:
            ctx["n"] = i
    durable_server.kill()

    for _ in range(3):
        for i, user in enumerate(users):
            elapsed, value = await timed(a.get(user))
            assert value == {"n": i}, value  # served from memory
            assert elapsed < 0.2 + SLACK

    async def write(user: str) -> None:
        async with a.edit(user) as ctx:
            ctx["n"] = -1

    for user in users:
        elapsed, error = await timed(write(user))
        assert isinstance(error, StoreUnavailable), error
        assert elapsed < 0.2 + SLACK
    assert a.breaker_state is BreakerState.OPEN
    rejected_before = counter(a.metrics.breaker_rejections)
    elapsed, error = await timed(write(users[0]))
    assert isinstance(error, StoreUnavailable) and "circuit open" in str(error)
    assert elapsed < 0.05  # no network while open
    assert counter(a.metrics.breaker_rejections) > rejected_before

    durable_server.start()

    async def can_write() -> bool:
        try:
            await a.update(users[0], lambda ctx: ctx.update(n=100))
            return True
        except StoreUnavailable:
            return False

    await eventually(can_write, deadline=5.0, interval=0.1)
    assert a.breaker_state is BreakerState.CLOSED
    for i, user in enumerate(users):
        assert (await a.get(user))["n"] == (
            100 if i == 0 else i
        )  # failed writes left nothing behind
    b: ContextStore = await stores("B", url=durable_server.url)
    assert (await b.get(users[0]))["n"] == 100
    assert (await b.get(users[1]))["n"] == 1


async def test_buffered_writes_survive_outage_and_flush(
    durable_server: RedisServer, stores: Stores
) -> None:
    # Held users are served and edited from memory only within listener_liveness of the last
    # proof; this test allows 5 s for its outage.
    a: ContextStore = await stores(
        "A",
        url=durable_server.url,
        on_redis_down="buffer",
        buffer_max=3,
        flush_interval="100ms",
        redis_timeout="200ms",
        breaker_failures=2,
        breaker_reset="200ms",
        listener_liveness="5s",
    )
    for user in ("x", "y", "z", "w"):
        async with a.edit(user) as ctx:
            ctx["n"] = 0
    durable_server.kill()
    for round_no in range(1, 4):
        for user in ("x", "y", "z"):
            async with a.edit(user) as ctx:
                ctx["n"] = round_no  # acknowledged from memory, buffered (latest value per user)
    assert a.pending_writes == 3
    with pytest.raises(StoreUnavailable):
        async with a.edit("w") as ctx:  # bound reached: a fourth user is refused
            ctx["n"] = 1
    assert (await a.get("x"))["n"] == 3

    durable_server.start()
    await eventually(lambda: a.pending_writes == 0, deadline=5.0)
    b: ContextStore = await stores("B", url=durable_server.url)
    for user in ("x", "y", "z"):
        assert (await b.get(user))["n"] == 3
    assert (await b.get("w"))["n"] == 0
    assert counter(a.metrics.fenced_flushes) == 0


async def test_buffered_flush_after_takeover_is_fenced_off(
    redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    # A reaches Redis through the relay (cut below); B reaches it directly.
    a: ContextStore = await stores(
        "A",
        url=tcp_proxy.url,
        on_redis_down="buffer",
        flush_interval="50ms",
        redis_timeout="200ms",
        breaker_failures=2,
        breaker_reset="100ms",
    )
    b: ContextStore = await stores("B")
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    tcp_proxy.block()
    async with a.edit("u") as ctx:
        ctx["n"] = 2  # buffered on A
    assert a.pending_writes == 1
    async with b.edit("u") as ctx:  # B takes over and writes while A is cut off
        ctx["n"] = ctx["n"] + 10
    tcp_proxy.unblock()
    await eventually(lambda: a.pending_writes == 0, deadline=5.0)
    assert counter(a.metrics.fenced_flushes) == 1  # A's late flush was dropped, not applied
    with redis_server.client() as c:
        assert c.hget(record_key("t", "u"), "data") == b'{"n":11}'
    await eventually(lambda: a.listener_connected, deadline=5.0)
    assert (await a.get("u"))["n"] == 11


async def test_redis_restarted_empty_loses_only_what_redis_lost(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A", redis_timeout="200ms", breaker_reset="100ms")
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    redis_server.restart()  # no persistence: the record is gone
    await eventually(lambda: counter(a.metrics.listener_reconnects) >= 1, deadline=5.0)
    await eventually(lambda: a.listener_connected, deadline=5.0)

    async def revalidated_empty() -> bool:
        try:
            return await a.get("u") == {}
        except StoreUnavailable:
            return False

    # Revalidated against the empty Redis, never served from the now-unverified copy.
    await eventually(revalidated_empty, deadline=3.0, interval=0.05)


@pytest.mark.slow
async def test_client_pause_bounds_calls_opens_breaker_and_recovers(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores(
        "A", redis_timeout="200ms", breaker_failures=3, breaker_reset="500ms"
    )
    async with a.edit("held") as ctx:
        ctx["n"] = 1
    redis_server.pause(3.0)
    try:
        for _ in range(3):
            elapsed, error = await timed(a.get("new-user"))
            assert isinstance(error, StoreUnavailable), error
            assert elapsed < 0.2 + SLACK
        assert a.breaker_state is BreakerState.OPEN
        elapsed, error = await timed(a.get("new-user"))
        assert isinstance(error, StoreUnavailable) and elapsed < 0.05
        assert (await a.get("held"))["n"] == 1  # owned users keep being read from memory
        elapsed, error = await timed(a.update("held", lambda ctx: ctx.update(n=2)))
        assert isinstance(error, StoreUnavailable) and elapsed < 0.2 + SLACK
    finally:
        redis_server.unpause()

    async def recovered() -> bool:
        try:
            await a.update("held", lambda ctx: ctx.update(n=3))
            return True
        except StoreUnavailable:
            return False

    await eventually(recovered, deadline=5.0, interval=0.1)
    assert a.breaker_state is BreakerState.CLOSED
    assert (await a.get("held"))["n"] == 3
    assert a.metrics.redis_errors.labels("acquire")._value.get() >= 3


async def test_listener_drop_revalidates_each_entry_once(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A")
    users = ["p", "q", "r"]
    for user in users:
        async with a.edit(user) as ctx:
            ctx["n"] = 1
    reconnects = counter(a.metrics.listener_reconnects)
    with redis_server.client() as c:
        assert c.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    await eventually(lambda: counter(a.metrics.listener_reconnects) > reconnects, deadline=5.0)
    await eventually(lambda: a.listener_connected, deadline=5.0)

    before = redis_server.commandstats()
    for user in users:
        assert (await a.get(user))["n"] == 1
    calls = redis_server.store_calls(before)
    assert calls == {"hmget": len(users)}, calls  # one read each, no re-acquire
    before = redis_server.commandstats()
    for user in users:
        assert (await a.get(user))["n"] == 1
    assert redis_server.store_calls(before) == {}  # verified again: back to zero


async def stale_window(
    a: ContextStore, user: str, stale: Any, started: float, *, until: float
) -> float:
    """Read ``user`` from ``a`` in a loop until ``until`` seconds after ``started``; return how
    long after ``started`` the last read that returned ``stale`` happened (0 if none)."""
    last = 0.0
    while time.monotonic() - started < until:
        try:
            if await a.get(user) == stale:
                last = time.monotonic() - started
        except StoreUnavailable:
            pass
        await asyncio.sleep(0.005)
    return last


@pytest.mark.parametrize("cut", ["closed", "silent"])
async def test_unreachable_redis_never_extends_the_stale_window(
    cut: str, redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    # A reaches Redis only through the relay; B directly. The relay is cut (connections closed)
    # or goes silent (nothing relayed, nothing closed: a dead peer). B takes the user over. A may
    # serve its copy only until its last liveness proof is listener_liveness old, whatever its
    # breaker says (kept closed here by a high threshold), and afterwards refuses until it can
    # check with Redis.
    liveness = 0.4
    a: ContextStore = await stores(
        "A",
        url=tcp_proxy.url,
        redis_timeout="100ms",
        breaker_failures=10_000,
        listener_liveness=liveness,
    )
    b: ContextStore = await stores("B")
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    started = time.monotonic()
    if cut == "closed":
        tcp_proxy.block()
    else:
        tcp_proxy.stall()
    async with b.edit("u") as ctx:
        ctx["n"] = 2
    last_stale = await stale_window(a, "u", {"n": 1}, started, until=liveness * 3)
    assert last_stale <= liveness + SLACK, last_stale
    assert a.breaker_state is BreakerState.CLOSED  # the breaker played no part
    with pytest.raises(StoreUnavailable):
        await a.get("u")
    assert a.metrics.unverified_refusals._value.get() >= 1
    tcp_proxy.unblock()
    tcp_proxy.unstall()

    async def fresh() -> bool:
        try:
            return (await a.get("u"))["n"] == 2
        except StoreUnavailable:
            return False

    await eventually(fresh, deadline=5.0, interval=0.05)


@pytest.mark.slow
async def test_default_liveness_bounds_a_silently_dead_listener_to_one_second(
    redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    a: ContextStore = await stores("A", url=tcp_proxy.url)
    b: ContextStore = await stores("B")
    assert a.settings.listener_liveness == 1.0
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    started = time.monotonic()
    tcp_proxy.stall()
    async with b.edit("u") as ctx:
        ctx["n"] = 2
    last_stale = await stale_window(a, "u", {"n": 1}, started, until=2.5)
    assert 0 < last_stale <= 1.0 + SLACK, last_stale
    tcp_proxy.unstall()


async def test_empty_redis_restart_rewrites_buffered_change_instead_of_blaming_a_takeover(
    redis_server: RedisServer, stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    a: ContextStore = await stores(
        "A",
        on_redis_down="buffer",
        flush_interval="50ms",
        redis_timeout="200ms",
        breaker_failures=2,
        breaker_reset="100ms",
        listener_liveness="5s",
    )
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    redis_server.kill()
    async with a.edit("u") as ctx:
        ctx["n"] = 2  # acknowledged from memory, buffered
    assert a.pending_writes == 1
    redis_server.start()  # no persistence: the record is gone, and nobody took the user over
    await eventually(lambda: a.pending_writes == 0, deadline=5.0)
    with redis_server.client() as c:
        assert c.hget(record_key("t", "u"), "data") == b'{"n":2}'
    assert counter(a.metrics.fenced_flushes) == 0
    assert (
        sum(a.metrics.dropped_changes.labels(r)._value.get() for r in ("taken_over", "record_lost"))
        == 0
    )
    assert "taken over" not in caplog.text
    assert "re-written" in caplog.text
    b: ContextStore = await stores("B")
    assert (await b.get("u"))["n"] == 2


@pytest.mark.slow
async def test_cancelled_call_never_hands_its_reply_to_the_next_caller(
    redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    # In the spirit of redis-py's test_cwe_404: a relay delays replies, a call is cancelled
    # after its command went out, and the next caller on the same (single) connection must get
    # its own reply.
    with redis_server.client() as c:
        c.set("foo", "foo-value")
        c.set("bar", "bar-value")
    target = parse_redis_url(tcp_proxy.url)
    clients = build_clients(target, timeout=2.0, pool_size=1)
    try:
        raw = clients.command
        assert await raw.get("foo") == b"foo-value"
        tcp_proxy.reply_delay = 0.1
        for _ in range(3):
            seen = tcp_proxy.requests_seen
            task: asyncio.Task[Any] = asyncio.ensure_future(raw.get("foo"))
            await eventually(relayed_since(tcp_proxy, seen), deadline=2.0, interval=0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await raw.get("bar") == b"bar-value"
    finally:
        await clients.aclose()

    # The same through the store: a cancelled acquire does not feed another user's request.
    writer: ContextStore = await stores("W")
    for user, value in (("alice", 1), ("bob", 2)):
        async with writer.edit(user) as ctx:
            ctx["v"] = value
    tcp_proxy.reply_delay = 0.0
    a: ContextStore = await stores("A", url=tcp_proxy.url, pool_size=1, redis_timeout="2s")
    tcp_proxy.reply_delay = 0.1
    for _ in range(2):
        seen = tcp_proxy.requests_seen
        task = asyncio.create_task(a.get("alice"))
        await eventually(relayed_since(tcp_proxy, seen), deadline=2.0, interval=0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await a.get("bob"))["v"] == 2
        assert not a.holds("alice")
        a._cache.pop("bob")  # force the next round through Redis again
    assert a.breaker_state is BreakerState.CLOSED
