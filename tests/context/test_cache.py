"""The guarded per-user cache against a real (aiohttp) origin on 127.0.0.1: coalescing, ttl
and per-user invalidation, the breaker and stale-if-error, origin timeouts, a move of the
user between two stores on one real redis-server, a Redis outage, and bad settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, web
from aiohttp.test_utils import TestServer

from stickyproxy.context import ConfigError, GuardedCache, OriginUnavailable
from stickyproxy.context.breaker import BreakerState
from stickyproxy.context.cache import freshness

from .conftest import RedisServer, eventually

Stores = Callable[..., Any]


class Origin:
    """A slow origin: ``GET /{user}/{key}`` answers ``{user, key, version}``; it can be held
    (gate), made to fail (500) or to stall, and counts the requests it received."""

    def __init__(self) -> None:
        self.hits = 0
        self.version = 1
        self.gate = asyncio.Event()
        self.gate.set()
        self.failing = False
        self.server: TestServer | None = None
        self.http: ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await self.gate.wait()
        if self.failing:
            return web.Response(status=500, text="origin down")
        return web.json_response({**request.match_info, "version": self.version})

    def loader(self, user: str, key: str) -> Callable[[], Any]:
        async def load() -> Any:
            assert self.server is not None and self.http is not None
            async with self.http.get(self.server.make_url(f"/{user}/{key}")) as r:
                r.raise_for_status()
                return await r.json()

        return load


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    o = Origin()
    app = web.Application()
    app.router.add_get("/{user}/{key}", o.handle)
    o.server = TestServer(app, host="127.0.0.1")
    await o.server.start_server()
    o.http = ClientSession(timeout=ClientTimeout(total=5))
    try:
        yield o
    finally:
        o.gate.set()
        await o.http.close()
        await o.server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0.0, "fresh"), (9.99, "fresh"), (10.0, "stale"), (39.9, "stale"), (40.0, "expired")],
)
def test_freshness(age: float, expected: str) -> None:
    assert freshness(age, 10.0, 30.0) == expected
    assert freshness(age, 10.0, 0.0) == ("fresh" if age < 10 else "expired")


def test_bad_settings_all_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        GuardedCache(
            ttl=0, max_entries=0, breaker_failures=-1, stale_if_error=-5, origin_timeout="soon"
        )
    text = str(caught.value)
    for name in ("ttl:", "max_entries:", "breaker_failures:", "stale_if_error:", "origin_timeout:"):
        assert name in text


async def test_concurrent_misses_are_one_origin_load(origin: Origin) -> None:
    cache = GuardedCache()
    origin.gate.clear()
    waiters = [
        asyncio.create_task(cache.get("u", "profile", origin.loader("u", "profile")))
        for _ in range(50)
    ]
    other = asyncio.create_task(cache.get("v", "profile", origin.loader("v", "profile")))
    await eventually(lambda: origin.hits == 2)
    waiters[0].cancel()  # a waiter leaving does not cancel the load the others wait for
    origin.gate.set()
    values = await asyncio.gather(*waiters[1:])
    assert all(v == {"user": "u", "key": "profile", "version": 1} for v in values)
    assert (await other)["user"] == "v"
    assert origin.hits == 2
    assert cache.metrics.lookups.labels("coalesced")._value.get() == 49
    assert await cache.get("u", "profile", origin.loader("u", "profile")) == values[0]
    assert origin.hits == 2


async def test_ttl_and_per_user_invalidation(origin: Origin) -> None:
    clock = Clock()
    cache = GuardedCache(ttl=10, clock=clock)
    for user in ("u", "v"):
        for key in ("a", "b"):
            await cache.get(user, key, origin.loader(user, key))
    assert origin.hits == 4
    origin.version = 2
    assert cache.invalidate("u") == 2
    assert (await cache.get("u", "a", origin.loader("u", "a")))["version"] == 2
    assert (await cache.get("v", "a", origin.loader("v", "a")))["version"] == 1  # v untouched
    clock.now += 10
    assert (await cache.get("v", "a", origin.loader("v", "a")))["version"] == 2
    assert origin.hits == 6


async def test_bounded(origin: Origin) -> None:
    cache = GuardedCache(max_entries=3)
    for key in "abcde":
        await cache.get("u", key, origin.loader("u", key))
    assert len(cache) == 3


async def test_breaker_opens_serves_stale_and_recovers(origin: Origin) -> None:
    clock = Clock()
    cache = GuardedCache(
        ttl=10, stale_if_error=60, breaker_failures=3, breaker_reset=5, clock=clock
    )
    await cache.get("u", "a", origin.loader("u", "a"))
    clock.now += 11  # "a" is stale now
    origin.failing = True
    # Stale entry answers while the origin fails; a key without one raises.
    assert (await cache.get("u", "a", origin.loader("u", "a")))["version"] == 1
    for key in ("b", "c"):
        with pytest.raises(OriginUnavailable, match="origin failed: ClientResponseError"):
            await cache.get("u", key, origin.loader("u", key))
    assert cache.breaker_state is BreakerState.OPEN
    hits = origin.hits
    for _ in range(20):
        with pytest.raises(OriginUnavailable, match="origin circuit open"):
            await cache.get("u", "b", origin.loader("u", "b"))
        assert (await cache.get("u", "a", origin.loader("u", "a")))["version"] == 1
    assert origin.hits == hits  # nothing reached the failing origin while open
    origin.failing, origin.version = False, 2
    clock.now += 5
    assert (await cache.get("u", "a", origin.loader("u", "a")))["version"] == 2  # the probe
    assert cache.breaker_state is BreakerState.CLOSED


async def test_origin_timeout_counts_as_failure(origin: Origin) -> None:
    cache = GuardedCache(origin_timeout="100ms", breaker_failures=1)
    origin.gate.clear()
    with pytest.raises(OriginUnavailable, match="within 0.1s"):
        await cache.get("u", "a", origin.loader("u", "a"))
    assert cache.breaker_state is BreakerState.OPEN
    assert cache.metrics.origin_loads.labels("timeout")._value.get() == 1


async def test_a_move_invalidates_the_users_entries(stores: Stores, origin: Origin) -> None:
    a, b = await stores("A"), await stores("B")
    cache = GuardedCache(store=a)
    await a.get("u")  # the user is held here (the context middleware does this per request)
    await cache.get("u", "a", origin.loader("u", "a"))
    await cache.get("u", "a", origin.loader("u", "a"))
    assert origin.hits == 1
    origin.version = 2
    await b.get("u")  # the user moves to B
    await eventually(lambda: not a.holds("u"))
    await a.get("u")  # ... and back to A, under a newer epoch
    assert (await cache.get("u", "a", origin.loader("u", "a")))["version"] == 2
    assert origin.hits == 2


async def test_redis_outage_cache_keeps_answering(
    stores: Stores, redis_server: RedisServer, origin: Origin
) -> None:
    store = await stores("A", listener_liveness="100ms", redis_timeout="100ms")
    cache = GuardedCache(store=store)
    await store.get("u")
    await cache.get("u", "a", origin.loader("u", "a"))
    redis_server.kill()
    await eventually(lambda: not store.listener_connected)
    # Hits and origin loads need no Redis: the held copy's epoch is known from memory.
    assert (await cache.get("u", "a", origin.loader("u", "a")))["version"] == 1
    assert (await cache.get("u", "b", origin.loader("u", "b")))["key"] == "b"
    assert (await cache.get("u", "b", origin.loader("u", "b")))["key"] == "b"
    assert origin.hits == 2
