"""A user's cart and counter, in one of two places.

``ContextState`` keeps them in the user's context (``stickyproxy.context``), which the context
middleware loads before the handler and saves after it: a read costs no Redis call once this
instance holds the user, a change is one fenced write, and whichever instance serves the user
after a failover rehydrates both from Redis.

``RedisState`` is the stateless design: every read and every change is a Redis command, the
cheapest one that does the job (HGETALL, HINCRBY, HDEL, GET, INCR).
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from stickyproxy.context import get_context

CART = "cart"
COUNTER = "counter"


class UserState(Protocol):
    async def cart(self, request: web.Request, user: str) -> dict[str, int]: ...
    async def add(self, request: web.Request, user: str, item: str, qty: int) -> int: ...
    async def remove(self, request: web.Request, user: str, item: str) -> bool: ...
    async def counter(self, request: web.Request, user: str) -> int: ...
    async def increment(self, request: web.Request, user: str) -> int: ...


class ContextState:
    """The request's context is the user's: the middleware has already loaded it."""

    async def cart(self, request: web.Request, user: str) -> dict[str, int]:
        return dict(get_context(request).get(CART, {}))

    async def add(self, request: web.Request, user: str, item: str, qty: int) -> int:
        cart = get_context(request).setdefault(CART, {})
        cart[item] = cart.get(item, 0) + qty
        return cart[item]

    async def remove(self, request: web.Request, user: str, item: str) -> bool:
        return get_context(request).get(CART, {}).pop(item, None) is not None

    async def counter(self, request: web.Request, user: str) -> int:
        return int(get_context(request).get(COUNTER, 0))

    async def increment(self, request: web.Request, user: str) -> int:
        context = get_context(request)
        context[COUNTER] = int(context.get(COUNTER, 0)) + 1
        return context[COUNTER]


def cart_key(namespace: str, user: str) -> str:
    return f"{namespace}:{{{user}}}:cart"


def counter_key(namespace: str, user: str) -> str:
    return f"{namespace}:{{{user}}}:counter"


class RedisState:
    def __init__(self, redis: Any, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace

    async def cart(self, request: web.Request, user: str) -> dict[str, int]:
        raw = await self.redis.hgetall(cart_key(self.namespace, user))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def add(self, request: web.Request, user: str, item: str, qty: int) -> int:
        return int(await self.redis.hincrby(cart_key(self.namespace, user), item, qty))

    async def remove(self, request: web.Request, user: str, item: str) -> bool:
        return bool(await self.redis.hdel(cart_key(self.namespace, user), item))

    async def counter(self, request: web.Request, user: str) -> int:
        return int(await self.redis.get(counter_key(self.namespace, user)) or 0)

    async def increment(self, request: web.Request, user: str) -> int:
        return int(await self.redis.incr(counter_key(self.namespace, user)))
