"""aiohttp integration: a middleware that loads the user's context before the handler and saves
it after, and a handler that serves the store's metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from .errors import ConflictError, MissingUserKey, RecordMismatch, StoreUnavailable
from .headers import (
    DEFAULT_HEADERS,
    DEFAULT_KEY_HEADER,
    StickyHeaders,
    StickyInfo,
    user_key_problem,
)
from .metrics import CONTENT_TYPE
from .retry import should_rerun_handler
from .store import ContextStore

# request[CONTEXT_KEY] is the user's mutable context; request[INFO_KEY] the proxy's headers.
CONTEXT_KEY: web.RequestKey[dict[str, Any]] = web.RequestKey("sticky_ctx", dict)
INFO_KEY: web.RequestKey[StickyInfo] = web.RequestKey("sticky_info", StickyInfo)
# the header names the middleware reads, so that errors name the configured key header
NAMES_KEY: web.RequestKey[StickyHeaders] = web.RequestKey("sticky_names", StickyHeaders)
# Runs of an idempotent handler whose save keeps conflicting, before the client gets a 409.
DEFAULT_MAX_ATTEMPTS = 3
# Seconds a client is told to wait after a 503 (the breaker's reset is of this order).
RETRY_AFTER = "1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _plain(status: int, reason: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n", headers=headers or None)


def get_context(request: web.Request) -> dict[str, Any]:
    """The mutable context of the request's user; raises :class:`MissingUserKey` (answered 400
    by the middleware) if the request carried no user key."""
    context: dict[str, Any] | None = request.get(CONTEXT_KEY)
    if context is None:
        names = request.get(NAMES_KEY)
        raise MissingUserKey(DEFAULT_KEY_HEADER if names is None else names.key)
    return context


def get_info(request: web.Request) -> StickyInfo | None:
    """What the proxy's headers said about the request (None outside the middleware)."""
    return request.get(INFO_KEY)


def context_middleware(
    store: ContextStore,
    *,
    headers: StickyHeaders = DEFAULT_HEADERS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    require: Callable[[web.Request], bool] | None = None,
    skip: Callable[[web.Request], bool] | None = None,
) -> Middleware:
    """Middleware: :func:`get_context` (or ``request[CONTEXT_KEY]``) is the user's mutable context,
    saved after the handler returns, only if it changed (a raising handler saves nothing), and
    before the response is released, so an acknowledged change is in Redis (write-through).
    :func:`get_info` (``request[INFO_KEY]``) is the :class:`StickyInfo` from the proxy's headers.

    No user key: 400 if ``require(request)`` is true or the handler calls :func:`get_context`.
    Conflict on save: GET/HEAD/OPTIONS/TRACE/PUT/DELETE handlers are run again (``max_attempts`` runs
    in all), others get 409. Store unavailable: 503.
    A handler that streams its response (``prepare()``) has sent it before the save.
    Requests for which ``skip(request)`` is true bypass the middleware entirely (no context,
    no per-user lock): use it for WebSocket and other long-lived handlers, which would
    otherwise hold the user's lock, and delay the save, for as long as they run.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")

    @web.middleware
    async def sticky_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        if skip is not None and skip(request):
            return await handler(request)
        info = StickyInfo.from_lookup(request.headers.get, headers)
        request[INFO_KEY] = info
        request[NAMES_KEY] = headers
        user = info.user
        if user is None:
            if require is not None and require(request):
                return _plain(400, f"missing {headers.key} header")
            try:
                return await handler(request)
            except MissingUserKey:
                return _plain(400, f"missing {headers.key} header")
        problem = user_key_problem(user)
        if problem is not None:
            return _plain(400, problem)
        if request.can_read_body and max_attempts > 1:
            # A rerun must see the same body: read it once, aiohttp keeps it for later reads.
            await request.read()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with store.edit(user) as context:
                    request[CONTEXT_KEY] = context
                    response = await handler(request)
                return response
            except ConflictError:
                if should_rerun_handler(request.method, attempt, max_attempts):
                    continue
                return _plain(409, "user context changed on another instance; retry the request")
            except StoreUnavailable:
                return _plain(503, "user context store unavailable", **{"Retry-After": RETRY_AFTER})
            except RecordMismatch:
                return _plain(500, "user context record is inconsistent")

    return sticky_context


def metrics_handler(store: ContextStore) -> Handler:
    """An aiohttp handler serving the store's metrics: ``app.router.add_get("/metrics", metrics_handler(store))``."""

    async def handle(request: web.Request) -> web.Response:
        response = web.Response(body=store.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    return handle
