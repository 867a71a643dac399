"""Cancellation at each await point of the store's Redis calls (in the manner of httpcore's
tests/test_cancellations.py): a relay in front of a real Redis either swallows the request (the
call is cancelled before Redis saw it) or holds the reply back (cancelled after Redis executed it,
before the reply). After every cancellation:

* the local copy equals what Redis holds, or it is unverified and re-read before it is served;
* an acknowledged buffered change is in Redis, still buffered, or fenced off with a count and a
  log line; never silently gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from stickyproxy.context import ContextStore
from stickyproxy.context.scripts import ACQUIRE, DELETE, WRITE, record_key

from .conftest import RedisServer, TcpProxy, eventually

Stores = Callable[..., Any]
POINTS = ("before-redis", "reply-pending")
# Long enough that the cancellation always lands while the reply is held back.
REPLY_DELAY = 0.3


def stored(server: RedisServer, user: str) -> dict[str, Any]:
    """The user's context as Redis holds it ({} for none or a tombstone)."""
    with server.client() as c:
        data = c.hget(record_key("t", user), "data")
    return json.loads(data) if data else {}


def dropped(store: ContextStore, reason: str) -> float:
    return store.metrics.dropped_changes.labels(reason)._value.get()


async def cancel_at(point: str, proxy: TcpProxy, start: Callable[[], Awaitable[Any]]) -> None:
    """Start ``start()``, cancel it once its request left the client at ``point``, and wait for
    it to end. Afterwards the relay passes traffic normally again."""
    if point == "before-redis":
        proxy.drop_requests = True
    else:
        proxy.reply_delay = REPLY_DELAY
    seen, answered = proxy.requests_seen, proxy.replies_seen
    task = asyncio.ensure_future(start())
    try:
        if point == "reply-pending":
            # Redis executed the call and replied; the relay holds the reply back.
            await eventually(lambda: proxy.replies_seen > answered, deadline=2.0, interval=0.001)
        else:
            await eventually(lambda: proxy.requests_seen > seen, deadline=2.0, interval=0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        proxy.drop_requests = False
        proxy.reply_delay = 0.0


async def relay_store(
    stores: Stores, proxy: TcpProxy, server: RedisServer, **kwargs: Any
) -> ContextStore:
    """A store reaching Redis through the relay. Its listener pings rarely and the scripts are
    loaded beforehand (no NOSCRIPT round), so the only traffic through the relay during a test
    step is the call under test."""
    with server.client() as c:
        for script in (ACQUIRE, WRITE, DELETE):
            c.script_load(script)
    kwargs.setdefault("redis_timeout", "2s")
    kwargs.setdefault("listener_liveness", "60s")
    return await stores("A", url=proxy.url, **kwargs)


async def new_subscription(store: ContextStore, server: RedisServer) -> None:
    """Kill the store's listener connection and wait for the next one: every copy it held is
    unverified from then on."""
    reconnects = store.metrics.listener_reconnects._value.get()
    with server.client() as c:
        c.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await eventually(
        lambda: (
            store.metrics.listener_reconnects._value.get() > reconnects and store.listener_connected
        )
    )


@pytest.mark.parametrize("point", POINTS)
async def test_cancelled_write_through_leaves_copy_equal_to_redis(
    point: str, redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    a = await relay_store(stores, tcp_proxy, redis_server)
    async with a.edit("u") as ctx:
        ctx["n"] = 1

    async def bump() -> None:
        async with a.edit("u") as ctx:
            ctx["n"] += 1

    await cancel_at(point, tcp_proxy, bump)
    assert stored(redis_server, "u") == ({"n": 2} if point == "reply-pending" else {"n": 1})
    # Whatever Redis got, the copy served next is Redis's, and the next edit builds on it.
    assert await a.get("u") == stored(redis_server, "u")
    await bump()
    assert stored(redis_server, "u")["n"] == (3 if point == "reply-pending" else 2)


@pytest.mark.parametrize("point", POINTS)
async def test_cancelled_flush_keeps_the_acknowledged_change(
    point: str, redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    a = await relay_store(stores, tcp_proxy, redis_server, mode="write-behind", flush_interval="1h")
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    await a.flush()
    async with a.edit("u") as ctx:
        ctx["n"] = 2  # acknowledged from memory, buffered
    await cancel_at(point, tcp_proxy, a.flush)
    assert a.pending_writes == 1  # put back, whether or not it landed
    assert await a.get("u") == {"n": 2}
    assert await a.flush() == 1
    assert stored(redis_server, "u") == {"n": 2}
    assert a.pending_writes == 0
    assert sum(dropped(a, r) for r in ("taken_over", "deleted", "record_lost", "closed")) == 0


@pytest.mark.parametrize("point", POINTS)
async def test_cancelled_flush_inside_a_request_keeps_the_change(
    point: str, redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    # The buffered change is taken off the buffer by the flush that precedes a re-acquire,
    # inside another call that is cancelled.
    a = await relay_store(
        stores,
        tcp_proxy,
        redis_server,
        on_redis_down="buffer",
        flush_interval="1h",
        redis_timeout="600ms",
    )
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    tcp_proxy.drop_requests = True
    async with a.edit("u") as ctx:
        ctx["n"] = 2  # the write times out: buffered and acknowledged
    tcp_proxy.drop_requests = False
    assert a.pending_writes == 1
    await new_subscription(a, redis_server)  # the copy must now be revalidated, which flushes first
    await cancel_at(point, tcp_proxy, lambda: a.get("u"))
    assert a.pending_writes == 1 or stored(redis_server, "u") == {"n": 2}
    assert await a.get("u") == {"n": 2}
    assert stored(redis_server, "u") == {"n": 2}
    assert a.pending_writes == 0


@pytest.mark.parametrize("point", POINTS)
async def test_cancelled_delete_keeps_or_fences_the_buffered_change(
    point: str, redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    a = await relay_store(stores, tcp_proxy, redis_server, mode="write-behind", flush_interval="1h")
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    await a.flush()
    async with a.edit("u") as ctx:
        ctx["n"] = 2
    await cancel_at(point, tcp_proxy, lambda: a.delete("u"))
    await a.flush()
    if point == "reply-pending":
        # The delete landed: the buffered change is fenced off, counted and logged as such.
        assert stored(redis_server, "u") == {}
        assert dropped(a, "deleted") == 1
    else:
        assert stored(redis_server, "u") == {"n": 2}
        assert dropped(a, "deleted") == 0
    assert await a.get("u") == stored(redis_server, "u")


@pytest.mark.parametrize("point", POINTS)
async def test_cancelled_acquire_and_revalidate_serve_redis_afterwards(
    point: str, redis_server: RedisServer, tcp_proxy: TcpProxy, stores: Stores
) -> None:
    b: ContextStore = await stores("B")
    async with b.edit("v") as ctx:
        ctx["n"] = 5
    a = await relay_store(stores, tcp_proxy, redis_server)
    await cancel_at(point, tcp_proxy, lambda: a.get("v"))  # acquire
    assert not a.holds("v")
    assert await a.get("v") == {"n": 5}
    # B takes it back (update: B's own copy may be fenced if A's takeover message is still
    # on its way to B).
    await b.update("v", lambda ctx: ctx.update(n=6))
    await eventually(lambda: not a.holds("v"), deadline=3.0)
    assert await a.get("v") == {"n": 6}
    await new_subscription(a, redis_server)
    await cancel_at(point, tcp_proxy, lambda: a.get("v"))  # revalidation read
    assert await a.get("v") == stored(redis_server, "v") == {"n": 6}


async def test_close_cancelling_a_flush_mid_flight_still_writes_it(
    redis_server: RedisServer, tcp_proxy: TcpProxy, make_store: Callable[..., ContextStore]
) -> None:
    a = make_store(
        "A",
        url=tcp_proxy.url,
        mode="write-behind",
        flush_interval="20ms",
        redis_timeout="2s",
        listener_liveness="60s",
    )
    await a.start()
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    await eventually(lambda: a.pending_writes == 0, deadline=3.0)
    tcp_proxy.drop_requests = True
    seen = tcp_proxy.requests_seen
    async with a.edit("u") as ctx:
        ctx["n"] = 2
    # The flusher takes the change off the buffer; its write is lost on the way and waits.
    await eventually(
        lambda: tcp_proxy.requests_seen > seen and a._flushing == 1, deadline=3.0, interval=0.001
    )
    tcp_proxy.drop_requests = False
    await a.close()  # cancels the flusher mid-flush, then flushes (bounded)
    assert stored(redis_server, "u") == {"n": 2}
    assert dropped(a, "closed") == 0
