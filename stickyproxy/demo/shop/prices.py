"""A user's price for a product, looked up in a slow pricing origin through a cache.

Prices are per user (a loyalty discount), so a cache of them is per-user state. The origin is
either the built-in one (answers after ``--price-delay``, as a database a few milliseconds away
would) or an HTTP service (``--price-origin URL``: ``GET URL/prices/{user}/{item}`` answering
``{"price": cents}``; ``origin.py`` is one).

``StickyPrices`` is the context library's ``GuardedCache`` in this instance's memory: a hit is
a dictionary lookup (no Redis, no origin), concurrent misses of one price are one origin load,
a failing origin opens a breaker (nothing reaches it for ``BREAKER_RESET``) and fresh or
recently expired entries keep answering meanwhile. Entries are tied to the user's ownership
epoch, so a user who moved away and back is never served a price from before the move.
Redis is needed only to acquire a user this instance does not hold.

``RedisPrices`` is the stateless design: a shared cache in Redis, one ``HGET`` per lookup, a
miss loaded from the origin by whichever instance has it (no coalescing across requests) and
stored with ``HSET`` + ``PEXPIRE … NX`` (the user's prices expire together). Redis unreachable:
every lookup goes to the origin, as a cache-aside client that treats a cache error as a miss
does — the flood the guarded cache exists to prevent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import suppress
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import redis

from stickyproxy.context import (
    ContextStore,
    GuardedCache,
    OriginUnavailable,
    StoreUnavailable,
)

# Undiscounted prices in cents, one per product in the catalog.
BASE_PRICES = {
    "apple": 45,
    "banana": 30,
    "bread": 250,
    "butter": 320,
    "cheese": 640,
    "coffee": 890,
    "eggs": 310,
    "flour": 120,
    "honey": 560,
    "jam": 340,
    "milk": 110,
    "oats": 190,
    "pasta": 150,
    "pepper": 280,
    "rice": 210,
    "salt": 60,
    "sugar": 130,
    "tea": 420,
    "tomato": 70,
    "yogurt": 95,
}
# A user's discount is 0..MAX_DISCOUNT_PERCENT %, fixed by the user's id.
MAX_DISCOUNT_PERCENT = 20
# Longest one origin lookup may take before it counts as a failure (both modes).
ORIGIN_TIMEOUT = 1.0
# The sticky cache's breaker: this many failed loads in a row open it, for this many seconds.
BREAKER_FAILURES = 5
BREAKER_RESET = 5.0
# How long past its ttl a sticky entry may still answer while the origin is failing.
STALE_IF_ERROR = 300.0
# Prices one instance caches in all (a few per user is typical; LRU beyond).
MAX_ENTRIES = 100_000
# Longest origin reply read (a price is a small JSON object).
MAX_ORIGIN_REPLY = 4096


class PriceUnavailable(Exception):
    """The origin cannot give the price now (and no cached one may answer)."""


def discount_percent(user: str) -> int:
    return hashlib.sha256(user.encode()).digest()[0] % (MAX_DISCOUNT_PERCENT + 1)


def price_of(user: str, item: str) -> int:
    """The origin's price of ``item`` for ``user``, in cents."""
    return BASE_PRICES[item] * (100 - discount_percent(user)) // 100


class Origin(Protocol):
    async def price(self, user: str, item: str) -> int: ...
    async def close(self) -> None: ...


class BuiltInOrigin:
    """The pricing database, simulated in process: ``delay`` seconds per lookup."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lookups = 0

    async def price(self, user: str, item: str) -> int:
        self.lookups += 1
        await asyncio.sleep(self.delay)
        return price_of(user, item)

    async def close(self) -> None:
        pass


class HttpOrigin:
    """A pricing service over HTTP: ``GET {base}/prices/{user}/{item}`` → ``{"price": cents}``."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def price(self, user: str, item: str) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=ORIGIN_TIMEOUT)
            )
        url = f"{self.base}/prices/{quote(user, safe='')}/{quote(item, safe='')}"
        async with self._session.get(url) as r:
            if r.status != 200:
                raise PriceUnavailable(f"pricing origin answered {r.status}")
            body = await r.content.read(MAX_ORIGIN_REPLY)
        try:
            price = json.loads(body)["price"]
        except (ValueError, TypeError, KeyError):
            raise PriceUnavailable("pricing origin's reply has no price") from None
        if isinstance(price, bool) or not isinstance(price, int) or price < 0:
            raise PriceUnavailable(
                f"pricing origin's price is not a whole number of cents: {price!r}"
            )
        return price

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_origin(url: str | None, delay: float) -> Origin:
    return HttpOrigin(url) if url else BuiltInOrigin(delay)


class ShopPrices(Protocol):
    async def price(self, user: str, item: str) -> int: ...
    async def forget(self, user: str) -> int: ...
    async def close(self) -> None: ...


class StickyPrices:
    def __init__(self, store: ContextStore, origin: Origin, ttl: float) -> None:
        self.store = store
        self.origin = origin
        self.cache = GuardedCache(
            store=store,
            ttl=ttl,
            stale_if_error=STALE_IF_ERROR,
            max_entries=MAX_ENTRIES,
            origin_timeout=ORIGIN_TIMEOUT,
            breaker_failures=BREAKER_FAILURES,
            breaker_reset=BREAKER_RESET,
        )

    def __len__(self) -> int:
        return len(self.cache)

    async def price(self, user: str, item: str) -> int:
        if not self.store.holds(user):
            # Entries are kept only under the user's ownership epoch: take the user (one Redis
            # call, as the context middleware would) so that this lookup is cached. Redis down:
            # the lookup is still coalesced and guarded, only not kept.
            with suppress(StoreUnavailable):
                await self.store.get(user)
        try:
            return int(await self.cache.get(user, item, lambda: self.origin.price(user, item)))
        except OriginUnavailable as exc:
            raise PriceUnavailable(str(exc)) from None

    async def forget(self, user: str) -> int:
        return self.cache.invalidate(user)

    async def close(self) -> None:
        await self.cache.close()
        await self.origin.close()


def prices_key(namespace: str, user: str) -> str:
    return f"{namespace}:{{{user}}}:prices"


class RedisPrices:
    def __init__(self, redis_client: Any, namespace: str, origin: Origin, ttl: float) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.origin = origin
        self.ttl_ms = max(1, int(ttl * 1000))

    async def _origin(self, user: str, item: str) -> int:
        try:
            async with asyncio.timeout(ORIGIN_TIMEOUT):
                return await self.origin.price(user, item)
        except PriceUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any origin failure is the same 503
            raise PriceUnavailable(f"origin failed: {type(exc).__name__}: {exc}") from None

    async def price(self, user: str, item: str) -> int:
        key = prices_key(self.namespace, user)
        try:
            cached = await self.redis.hget(key, item)
        except redis.RedisError:
            return await self._origin(user, item)
        if cached is not None:
            return int(cached)
        price = await self._origin(user, item)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, item, price)
                pipe.pexpire(key, self.ttl_ms, nx=True)
                await pipe.execute()
        except redis.RedisError:
            pass
        return price

    async def forget(self, user: str) -> int:
        key = prices_key(self.namespace, user)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(key)
            pipe.delete(key)
            count, _ = await pipe.execute()
        return int(count)

    async def close(self) -> None:
        await self.origin.close()
