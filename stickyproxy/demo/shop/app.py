"""Builds the shop for its mode and serves it."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from stickyproxy.context import ContextStore, context_middleware

from .jobs import RedisJobs, StickyJobs
from .metrics import ShopMetrics
from .middleware import (
    authenticate,
    count_requests,
    only_under,
    rate_limit,
    redis_outage,
)
from .prices import RedisPrices, StickyPrices, make_origin
from .ratelimit import RedisRateLimiter, StickyRateLimiter
from .revocation import RedisRevocations, StickyRevocations
from .routes import MAX_BODY, add_routes
from .settings import Settings, parse_args
from .shop import SHOP_KEY, Shop
from .state import ContextState, RedisState

log = logging.getLogger("shop")

# Prefix of every Redis key the shop writes, in both modes.
NAMESPACE = "shop"
# Both modes use the context store's default pool size and per-call bound, so a comparison
# measures the designs, not their tuning.
REDIS_POOL_SIZE = 32
REDIS_TIMEOUT = 0.25
# Paths whose handlers use the user's context (the context middleware wraps only these:
# a WebSocket under it would hold the user's lock for as long as it stays open). /prices is
# not among them: its cache needs no Redis, so it keeps answering while Redis is down.
CONTEXT_PATHS = ("/cart", "/counter", "/logout", "/logout-everywhere")
# Seconds in-flight requests and WebSockets get to finish on SIGTERM.
SHUTDOWN_TIMEOUT = 2.0
SERVED_BY = "X-Served-By"


def stateless_redis(url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_POOL_SIZE,
        timeout=REDIS_TIMEOUT,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool)


def create_app(settings: Settings) -> web.Application:
    registry = CollectorRegistry(auto_describe=True)
    metrics = ShopMetrics(registry, node=settings.node_id, mode=settings.mode)
    middlewares: list[Middleware] = [count_requests, redis_outage, rate_limit, authenticate]
    origin = make_origin(settings.price_origin, settings.price_delay)
    if settings.stateless:
        client = stateless_redis(settings.redis_url)
        shop = Shop(
            settings,
            metrics,
            RedisState(client, NAMESPACE),
            RedisRateLimiter(client, NAMESPACE, settings.rate_limit, settings.rate_window)
            if settings.rate_limit
            else None,
            RedisJobs(client, NAMESPACE, settings.job_steps, settings.job_step_seconds),
            RedisRevocations(client, NAMESPACE, settings.token_lifetime),
            RedisPrices(client, NAMESPACE, origin, settings.price_ttl),
        )
        middlewares.append(shop.revocations.middleware())

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            yield
            await shop.jobs.close()
            await shop.prices.close()
            await client.aclose()
    else:
        # Unique per process: a restarted instance is a new owner in Redis's fencing.
        store = ContextStore(
            settings.redis_url,
            namespace=NAMESPACE,
            registry=registry,
            node_id=f"{settings.node_id}-{os.getpid()}-{secrets.token_hex(3)}",
        )
        limiter = (
            StickyRateLimiter(store, settings.rate_limit, settings.rate_window)
            if settings.rate_limit
            else None
        )
        shop = Shop(
            settings,
            metrics,
            ContextState(),
            limiter,
            StickyJobs(store, settings.job_steps, settings.job_step_seconds),
            StickyRevocations(store, settings.token_lifetime),
            StickyPrices(store, origin, settings.price_ttl),
        )
        metrics.rate_limit_users.set_function(lambda: len(limiter) if limiter is not None else 0)
        # The revocation check inside the context middleware: on its paths it reads the loaded
        # context; elsewhere (jobs, prices) it reads the store (memory, for a held user).
        middlewares += [
            only_under(CONTEXT_PATHS, context_middleware(store)),
            shop.revocations.middleware(),
        ]

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            await store.start()
            yield
            await shop.jobs.close()
            await shop.prices.close()
            await store.close()

    metrics.jobs_running.set_function(shop.jobs.running)
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[SHOP_KEY] = shop
    app.cleanup_ctx.append(lifecycle)

    async def served_by(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERVED_BY] = settings.node_id

    app.on_response_prepare.append(served_by)
    add_routes(app)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log=None,
        print=lambda _: log.info(
            "%s (%s) listening on http://%s:%d",
            settings.node_id,
            settings.mode,
            settings.host,
            settings.port,
        ),
    )
    return 0
