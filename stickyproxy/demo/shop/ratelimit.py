"""Per-user rate limit: ``limit`` requests per ``window``. Both limiters answer ``hit(user)``
with None (allowed) or the seconds until the user may send again.

``StickyRateLimiter`` is the context library's token bucket (burst ``limit``, refilled at
``limit / window`` per second) in this instance's memory: correct because the proxy sends the
user to this instance every time. No Redis command per request; the bucket is written to the
user's context only when the stored snapshot overstates the budget by half a burst, so a user
who moves to another instance (failover, ring change) gets less than half a burst extra.

``RedisRateLimiter`` is the stateless design: one round trip per request (INCR, and EXPIRE NX,
which sets the window's end only when the window opens; Redis >= 7.0).
"""

from __future__ import annotations

from typing import Any, Protocol

from stickyproxy.context import ContextStore, Limit, RateLimiter

# The name of the shop's one limit in the library's limiter (and its metrics' label).
LIMIT_NAME = "requests"


class ShopRateLimiter(Protocol):
    async def hit(self, user: str) -> float | None: ...


class StickyRateLimiter:
    def __init__(self, store: ContextStore, limit: int, window: float) -> None:
        self.limiter = RateLimiter({LIMIT_NAME: Limit.per(limit, window)}, store=store)

    def __len__(self) -> int:
        return len(self.limiter)

    async def hit(self, user: str) -> float | None:
        decision = await self.limiter.hit(user, LIMIT_NAME)
        return None if decision.allowed else decision.retry_after


def rate_key(namespace: str, user: str) -> str:
    return f"{namespace}:{{{user}}}:rl"


class RedisRateLimiter:
    def __init__(self, redis: Any, namespace: str, limit: int, window: float) -> None:
        self.redis = redis
        self.namespace = namespace
        self.limit = limit
        self.window_ms = max(1, int(window * 1000))

    async def hit(self, user: str) -> float | None:
        key = rate_key(self.namespace, user)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.pexpire(key, self.window_ms, nx=True)
            count, _ = await pipe.execute()
        if count <= self.limit:
            return None
        ttl_ms = await self.redis.pttl(key)
        return ttl_ms / 1000 if ttl_ms > 0 else self.window_ms / 1000
