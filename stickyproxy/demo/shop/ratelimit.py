"""Per-user rate limit: ``limit`` requests per fixed window that opens at the user's first
request. Both limiters answer ``hit(user)`` with None (allowed) or the seconds until the
user's window closes.

``LocalRateLimiter`` counts in this process's memory: correct because the proxy sends the
user to this instance every time. A user who moves to another instance (failover, ring
change) starts a fresh window there: at most one extra window's worth per move.

``RedisRateLimiter`` is the stateless design: one round trip per request (INCR, and EXPIRE NX,
which sets the window's end only when the window opens; Redis >= 7.0).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

# Users whose window is tracked in memory at once; beyond, the oldest window is forgotten.
MAX_TRACKED_USERS = 100_000


class RateLimiter(Protocol):
    async def hit(self, user: str) -> float | None: ...


class LocalRateLimiter:
    def __init__(self, limit: int, window: float, *, max_users: int = MAX_TRACKED_USERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.max_users = max_users
        self.clock = clock
        # user -> [window start, requests counted]; ordered by window start, oldest first.
        self._windows: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    async def hit(self, user: str) -> float | None:
        now = self.clock()
        w = self._windows.get(user)
        if w is None or now - w[0] >= self.window:
            self._windows.pop(user, None)
            self._windows[user] = [now, 1]
            self._prune(now)
            return None
        if w[1] >= self.limit:
            return w[0] + self.window - now
        w[1] += 1
        return None

    def _prune(self, now: float) -> None:
        windows = self._windows
        while windows:
            start = next(iter(windows.values()))[0]
            if now - start < self.window and len(windows) <= self.max_users:
                return
            windows.popitem(last=False)


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
