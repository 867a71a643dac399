"""A Starlette app behind stickyproxy, keeping each user's profile in the user's context.

``StickyContextMiddleware`` loads the context of the user the proxy names in ``X-Sticky-Key``
before a handler runs (``request.state.ctx``) and saves it, if it changed, before the
response leaves: reads cost no Redis call once this instance holds the user, and another
instance continues from the saved state after a failover.

Runs under any ASGI server; ``pip install 'stickyproxy[examples]'`` brings Starlette and
uvicorn. The settings come from the environment:

    STICKY_REDIS_URL=redis://127.0.0.1:6379/0 STICKY_NODE_ID=app-1 \\
        uvicorn asgi_app:app --port 9001      # or: hypercorn asgi_app:app --bind 127.0.0.1:9001

    GET  /me       the user's profile and how the proxy routed the request
    POST /visits   count a visit
    PUT  /theme    {"theme": "dark"}
    GET  /healthz, /metrics
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from stickyproxy.context import ContextStore, StickyContextMiddleware
from stickyproxy.context.metrics import CONTENT_TYPE

THEMES = ("light", "dark", "high-contrast")
# Paths that need no user: the proxy's health check and Prometheus.
PUBLIC_PATHS = ("/healthz", "/metrics")


async def me(request: Request) -> JSONResponse:
    ctx, info = request.state.ctx, request.state.sticky
    return JSONResponse(
        {
            "user": info.user,
            "visits": ctx.get("visits", 0),
            "theme": ctx.get("theme", THEMES[0]),
            "served_by": request.app.state.node_id,
            "route": info.route,
        }
    )


async def visit(request: Request) -> JSONResponse:
    ctx = request.state.ctx
    ctx["visits"] = ctx.get("visits", 0) + 1
    return JSONResponse({"visits": ctx["visits"]})


async def set_theme(request: Request) -> JSONResponse:
    try:
        theme = (await request.json()).get("theme")
    except (ValueError, AttributeError):
        theme = None
    if theme not in THEMES:
        return JSONResponse({"error": f"theme must be one of {', '.join(THEMES)}"}, status_code=400)
    request.state.ctx["theme"] = theme
    return JSONResponse({"theme": theme})


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok\n")


async def metrics(request: Request) -> Response:
    return Response(request.app.state.store.metrics.render(), media_type=CONTENT_TYPE)


def build(store: ContextStore, node_id: str) -> StickyContextMiddleware:
    """The ASGI app: Starlette wrapped in the context middleware. Its lifespan starts and
    closes ``store`` (a caller driving the app without lifespan events starts it itself)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.start()
        try:
            yield
        finally:
            await store.close()

    starlette = Starlette(
        routes=[
            Route("/me", me),
            Route("/visits", visit, methods=["POST"]),
            Route("/theme", set_theme, methods=["PUT"]),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
    starlette.state.node_id = node_id
    starlette.state.store = store
    return StickyContextMiddleware(
        starlette,
        store,
        skip=lambda scope: scope["path"] in PUBLIC_PATHS,
        require=lambda scope: True,
    )


app = build(
    ContextStore(
        os.environ.get("STICKY_REDIS_URL", "redis://127.0.0.1:6379/0"),
        namespace="asgi",
        node_id=None,
    ),
    os.environ.get("STICKY_NODE_ID", "asgi-app"),
)
