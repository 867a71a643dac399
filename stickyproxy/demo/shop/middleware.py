"""Middlewares of the shop, outermost first: request metrics, Redis outage (the stateless
client's or the context library's, outside the context middleware) → 503, the per-user
rate limit, the bearer token's verification, the context middleware on the routes that use
the user's context, and the revocation check (inside the context middleware, so that on those
routes it reads the context already loaded)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis
from aiohttp import web
from aiohttp.typedefs import Middleware

from stickyproxy.context import StoreUnavailable

from .revocation import CLAIMS_KEY, unauthorized
from .shop import SHOP_KEY
from .tokens import TokenRejected, verify
from .users import user_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Seconds a client is told to wait after a 503.
RETRY_AFTER = "1"


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[SHOP_KEY].metrics
    try:
        response = await handler(request)
    except web.HTTPException as e:
        metrics.requests.labels(_route(request), str(e.status)).inc()
        raise
    metrics.requests.labels(_route(request), str(response.status)).inc()
    return response


@web.middleware
async def redis_outage(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (redis.RedisError, StoreUnavailable):
        return web.json_response(
            {"error": "state store unavailable"}, status=503, headers={"Retry-After": RETRY_AFTER}
        )


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    shop = request.app[SHOP_KEY]
    user = user_of(request, stateless=shop.settings.stateless)
    if user is not None and shop.limiter is not None:
        wait = await shop.limiter.hit(user)
        if wait is not None:
            shop.metrics.rate_limited.inc()
            seconds = max(1, int(wait + 0.999))
            return web.json_response(
                {
                    "error": f"rate limit: {shop.settings.rate_limit} requests per "
                    f"{shop.settings.rate_window:g}s",
                    "retry_after": seconds,
                },
                status=429,
                headers={"Retry-After": str(seconds)},
            )
    return await handler(request)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request presenting a bearer token must present a valid one of its own user (the
    verified claims go to ``request[CLAIMS_KEY]`` for the revocation check); one presenting
    none passes: the demo's users are who the routed key says (a real app would require one)."""
    authorization = request.headers.get("Authorization")
    if authorization is None:
        return await handler(request)
    shop = request.app[SHOP_KEY]
    user = user_of(request, stateless=shop.settings.stateless)
    if user is None:
        return await handler(request)
    try:
        request[CLAIMS_KEY] = verify(
            authorization, user, shop.settings.token_secret, shop.settings.token_lifetime
        )
    except TokenRejected as exc:
        return unauthorized("invalid token", str(exc))
    return await handler(request)


def only_under(prefixes: tuple[str, ...], middleware: Middleware) -> Middleware:
    """``middleware`` for paths under ``prefixes``; other requests skip it."""

    @web.middleware
    async def scoped(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if any(path == p or path.startswith(p + "/") for p in prefixes):
            return await middleware(request, handler)
        return await handler(request)

    return scoped
