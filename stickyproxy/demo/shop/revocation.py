"""Logout: revoking the shop's tokens, and refusing revoked ones with 401, in either mode.

``StickyRevocations`` is the context library's ``Revocations``: the revoked ``jti``s and the
logout-everywhere cut-off live in the user's context, so the check (the library's
``revocation_middleware``) reads memory and a logout is one fenced write; the next owner
rehydrates them with the context, so a revoked token stays revoked after the user moves.

``RedisRevocations`` is the stateless design: a revocation list in Redis, checked on every
request that presents a token with one round trip (``EXISTS`` of the token's key and ``GET``
of the user's cut-off, pipelined: what ``bench/owner_features.py`` measures); a logout is a
``SET`` that expires with what it covers. Redis unreachable: the check fails closed (503).

In both modes the token has been verified first (``tokens.py``, the ``authenticate``
middleware), and a revoked token gets the same answer: 401 with ``WWW-Authenticate: Bearer
error="invalid_token"`` (RFC 6750 §3) and the reason in the body.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from stickyproxy.context import (
    ContextStore,
    Revocations,
    get_context,
    revocation_middleware,
)

from .users import user_of

# request[CLAIMS_KEY]: the verified claims of the request's bearer token (absent: no token).
CLAIMS_KEY: web.RequestKey[Mapping[str, Any]] = web.RequestKey("shop_claims", Mapping)
# The library's reasons, so that both modes answer a revoked token alike.
REVOKED = "token revoked"
REVOKED_BEFORE = "token issued before the user's tokens were revoked"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def challenge(summary: str) -> dict[str, str]:
    """The 401's header. ``summary`` is a fixed phrase: RFC 6750 §3's error_description
    excludes '"' and '\\'; the detail goes in the body."""
    return {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{summary}"'}


def unauthorized(summary: str, detail: str) -> web.Response:
    """401 for a bad or revoked token (from a middleware)."""
    return web.Response(status=401, text=detail + "\n", headers=challenge(summary))


class ShopRevocations(Protocol):
    def middleware(self) -> Middleware: ...
    async def revoke(self, request: web.Request, user: str, claims: Mapping[str, Any]) -> bool: ...
    async def revoke_all(self, request: web.Request, user: str) -> float: ...


def _claims(request: web.Request) -> Mapping[str, Any] | None:
    return request.get(CLAIMS_KEY)


class StickyRevocations:
    """The library's revocations. ``revoke``/``revoke_all`` run in handlers under the context
    middleware: they change the request's context, which the middleware saves (one fenced write)
    before the response leaves, so an acknowledged logout is in Redis."""

    def __init__(self, store: ContextStore, token_lifetime: float) -> None:
        self.revocations = Revocations(store, max_token_lifetime=token_lifetime)

    def middleware(self) -> Middleware:
        return revocation_middleware(self.revocations, claims=_claims)

    async def revoke(self, request: web.Request, user: str, claims: Mapping[str, Any]) -> bool:
        return self.revocations.revoke_in(get_context(request), claims["jti"], claims["exp"])

    async def revoke_all(self, request: web.Request, user: str) -> float:
        return self.revocations.revoke_all_in(get_context(request))


def revoked_key(namespace: str, user: str, jti: str) -> str:
    return f"{namespace}:{{{user}}}:revoked:{jti}"


def revoked_before_key(namespace: str, user: str) -> str:
    return f"{namespace}:{{{user}}}:revoked-before"


def stateless_verdict(jti_revoked: bool, before: float | None, iat: float) -> str | None:
    """The library's rule on what Redis answered: why the token is revoked, or None."""
    if jti_revoked:
        return REVOKED
    if before is not None and iat < before:
        return REVOKED_BEFORE
    return None


class RedisRevocations:
    def __init__(self, redis: Any, namespace: str, token_lifetime: float) -> None:
        self.redis = redis
        self.namespace = namespace
        self.lifetime_ms = max(1, int(token_lifetime * 1000))

    def middleware(self) -> Middleware:
        @web.middleware
        async def redis_revocation_check(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            claims = _claims(request)
            user = user_of(request, stateless=True)
            if claims is None or user is None:
                return await handler(request)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(revoked_key(self.namespace, user, claims["jti"]))
                pipe.get(revoked_before_key(self.namespace, user))
                exists, before = await pipe.execute()
            reason = stateless_verdict(
                bool(exists), None if before is None else float(before), float(claims["iat"])
            )
            if reason is not None:
                return unauthorized("token revoked", reason)
            return await handler(request)

        return redis_revocation_check

    async def revoke(self, request: web.Request, user: str, claims: Mapping[str, Any]) -> bool:
        exp_ms = int(float(claims["exp"]) * 1000)
        if exp_ms <= int(time.time() * 1000):
            return False
        await self.redis.set(revoked_key(self.namespace, user, claims["jti"]), 1, pxat=exp_ms)
        return True

    async def revoke_all(self, request: web.Request, user: str) -> float:
        cut = time.time()
        await self.redis.set(
            revoked_before_key(self.namespace, user), repr(cut), px=self.lifetime_ms
        )
        return cut
