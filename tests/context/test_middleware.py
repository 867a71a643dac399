"""The aiohttp middleware (real server on 127.0.0.1) and the ASGI middleware (Starlette app
through httpx.ASGITransport): load, save-if-changed, 400, conflict retry / 409, 503."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from stickyproxy.context import (
    ContextStore,
    StickyContextMiddleware,
    context_middleware,
    get_context,
    get_info,
    metrics_app,
    metrics_handler,
    sticky_context,
)
from stickyproxy.context.middleware_aiohttp import CONTEXT_KEY

from .conftest import RedisServer, eventually

Stores = Callable[..., Any]
KEY = {"X-Sticky-Key": "alice"}


class Scenario:
    """Shared handler behaviour: counts runs, and can make another store take the user over
    during the first run(s) so the save conflicts."""

    def __init__(self, rival: ContextStore) -> None:
        self.rival = rival
        self.runs = 0
        self.sabotage = 0

    async def bump(self, ctx: dict[str, Any]) -> int:
        self.runs += 1
        ctx["n"] = ctx.get("n", 0) + 1
        if self.sabotage > 0:
            self.sabotage -= 1
            await self.rival.update("alice", lambda c: c.update(rival=c.get("rival", 0) + 1))
        return int(ctx["n"])


# --- aiohttp -------------------------------------------------------------------------------
@pytest.fixture
async def aiohttp_app(stores: Stores) -> AsyncIterator[tuple[str, ContextStore, Scenario]]:
    store: ContextStore = await stores("A")
    scenario = Scenario(await stores("B"))

    async def count(request: web.Request) -> web.Response:
        n = await scenario.bump(get_context(request))
        info = get_info(request)
        return web.Response(text=f"{n} {info.route if info else None}")

    async def peek(request: web.Request) -> web.Response:
        return web.Response(text=str(request.get(CONTEXT_KEY, {}).get("n", 0)))

    async def anonymous(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def fail(request: web.Request) -> web.Response:
        get_context(request)["n"] = -1
        raise web.HTTPForbidden(text="no")

    async def stream(request: web.Request) -> web.Response:
        return web.Response(text="none" if CONTEXT_KEY not in request else "context")

    app = web.Application(
        middlewares=[
            context_middleware(
                store, require=lambda r: r.path == "/required", skip=lambda r: r.path == "/stream"
            )
        ]
    )
    app.router.add_route("*", "/count", count)
    app.router.add_get("/peek", peek)
    app.router.add_get("/anonymous", anonymous)
    app.router.add_get("/required", anonymous)
    app.router.add_get("/fail", fail)
    app.router.add_get("/stream", stream)
    app.router.add_get("/metrics", metrics_handler(store))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", store, scenario
    finally:
        await server.close()


async def test_aiohttp_loads_saves_and_exposes_headers(
    aiohttp_app: tuple[str, ContextStore, Scenario], stores: Stores
) -> None:
    base, store, scenario = aiohttp_app
    async with ClientSession() as http:
        for expected in (1, 2, 3):
            async with http.get(f"{base}/count", headers={**KEY, "X-Sticky-Route": "primary"}) as r:
                assert (r.status, await r.text()) == (200, f"{expected} primary")
        async with http.get(f"{base}/fail", headers=KEY) as r:
            assert r.status == 403
        async with http.get(f"{base}/peek", headers=KEY) as r:
            assert await r.text() == "3"  # the raising handler saved nothing
        async with http.get(f"{base}/metrics") as r:
            assert "stickyctx_writes_total 3.0" in await r.text()
    other: ContextStore = await stores("C")
    assert (await other.get("alice"))["n"] == 3  # acknowledged changes are in Redis


async def test_aiohttp_skip_bypasses_the_middleware(
    aiohttp_app: tuple[str, ContextStore, Scenario],
) -> None:
    url, store, _ = aiohttp_app
    async with ClientSession() as http:
        # no context, and no per-user lock: a skipped (e.g. WebSocket) handler cannot hold
        # the user's other requests up while it runs
        async with store._locks.hold("alice"), asyncio.timeout(5):
            async with http.get(f"{url}/stream", headers=KEY) as r:
                assert (r.status, await r.text()) == (200, "none")


async def test_aiohttp_missing_key_is_400(aiohttp_app: tuple[str, ContextStore, Scenario]) -> None:
    base, _, _ = aiohttp_app
    async with ClientSession() as http:
        async with http.get(f"{base}/count") as r:
            assert (r.status, await r.text()) == (400, "missing X-Sticky-Key header\n")
        async with http.get(f"{base}/required") as r:
            assert r.status == 400
        async with http.get(f"{base}/anonymous") as r:
            assert (r.status, await r.text()) == (200, "hello")
        async with http.get(f"{base}/count", headers={"X-Sticky-Key": "x" * 2000}) as r:
            assert r.status == 400


async def test_aiohttp_conflict_reruns_idempotent_and_409s_others(
    aiohttp_app: tuple[str, ContextStore, Scenario],
) -> None:
    base, store, scenario = aiohttp_app
    async with ClientSession() as http:
        async with http.get(f"{base}/count", headers=KEY) as r:
            assert r.status == 200
        scenario.sabotage, scenario.runs = 1, 0
        async with http.put(f"{base}/count", headers=KEY, data=b"body") as r:
            assert (r.status, await r.text()) == (200, "2 None")  # second run, on fresh data
        assert scenario.runs == 2
        scenario.sabotage, scenario.runs = 5, 0
        async with http.get(f"{base}/count", headers=KEY) as r:
            assert r.status == 409  # three runs, all conflicted
        assert scenario.runs == 3
        scenario.sabotage, scenario.runs = 1, 0
        async with http.post(f"{base}/count", headers=KEY) as r:
            assert r.status == 409
            assert "another instance" in await r.text()
        assert scenario.runs == 1
    assert (await scenario.rival.get("alice"))["n"] == 2


async def test_aiohttp_store_unavailable_is_503(
    redis_server: RedisServer, aiohttp_app: tuple[str, ContextStore, Scenario]
) -> None:
    base, store, _ = aiohttp_app
    async with ClientSession() as http:
        async with http.get(f"{base}/count", headers=KEY) as r:
            assert r.status == 200
        redis_server.kill()
        async with http.get(f"{base}/peek", headers=KEY) as r:
            # Within listener_liveness of the last proof: served from memory.
            assert (r.status, await r.text()) == (200, "1")
        async with http.get(f"{base}/count", headers={"X-Sticky-Key": "newcomer"}) as r:
            assert (r.status, r.headers.get("Retry-After")) == (503, "1")
        async with http.get(f"{base}/count", headers=KEY) as r:
            assert r.status == 503  # the change could not be made durable
        async with http.get(f"{base}/peek", headers=KEY) as r:
            # The failed write's outcome is unknown and Redis cannot be asked: not served.
            assert r.status == 503


# --- ASGI (Starlette) ----------------------------------------------------------------------
@pytest.fixture
async def asgi_client(
    stores: Stores,
) -> AsyncIterator[tuple[httpx.AsyncClient, ContextStore, Scenario]]:
    store: ContextStore = await stores("A")
    scenario = Scenario(await stores("B"))

    async def count(request: Request) -> PlainTextResponse:
        await request.body()
        n = await scenario.bump(request.state.ctx)
        return PlainTextResponse(f"{n} {request.scope['sticky'].backend}")

    async def needs(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(sticky_context(request).get("n", 0)))

    async def anonymous(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def fail(request: Request) -> PlainTextResponse:
        sticky_context(request)["n"] = -1
        raise RuntimeError("handler failed")

    app = Starlette(
        routes=[
            Route("/count", count, methods=["GET", "PUT", "POST"]),
            Route("/needs", needs),
            Route("/anonymous", anonymous),
            Route("/fail", fail),
        ]
    )
    wrapped = StickyContextMiddleware(
        app, store, require=lambda scope: scope["path"] == "/required"
    )

    async def root(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await metrics_app(store)(scope, receive, send)
        else:
            await wrapped(scope, receive, send)

    transport = httpx.ASGITransport(app=root, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client, store, scenario


async def test_asgi_loads_saves_and_exposes_headers(
    asgi_client: tuple[httpx.AsyncClient, ContextStore, Scenario], stores: Stores
) -> None:
    client, store, _ = asgi_client
    for expected in (1, 2):
        r = await client.get("/count", headers={**KEY, "X-Sticky-Backend": "app-1"})
        assert (r.status_code, r.text) == (200, f"{expected} app-1")
    r = await client.get("/fail", headers=KEY)
    assert r.status_code == 500
    assert (await client.get("/needs", headers=KEY)).text == "2"
    assert "stickyctx_writes_total 2.0" in (await client.get("/metrics")).text
    other: ContextStore = await stores("C")
    assert (await other.get("alice"))["n"] == 2


async def test_asgi_missing_key_is_400(
    asgi_client: tuple[httpx.AsyncClient, ContextStore, Scenario],
) -> None:
    client, _, _ = asgi_client
    r = await client.get("/needs")
    assert (r.status_code, r.text) == (400, "missing X-Sticky-Key header\n")
    assert (await client.get("/required")).status_code == 400
    assert (await client.get("/anonymous")).text == "hello"


async def test_asgi_conflict_reruns_idempotent_and_409s_others(
    asgi_client: tuple[httpx.AsyncClient, ContextStore, Scenario],
) -> None:
    client, store, scenario = asgi_client
    assert (await client.get("/count", headers=KEY)).status_code == 200
    scenario.sabotage, scenario.runs = 1, 0
    r = await client.put("/count", headers=KEY, content=b"same body twice")
    assert (r.status_code, r.text) == (200, "2 None")
    assert scenario.runs == 2
    scenario.sabotage, scenario.runs = 1, 0
    r = await client.post("/count", headers=KEY)
    assert r.status_code == 409 and scenario.runs == 1
    scenario.sabotage, scenario.runs = 5, 0
    assert (await client.get("/count", headers=KEY)).status_code == 409
    assert scenario.runs == 3


async def test_asgi_store_unavailable_is_503(
    redis_server: RedisServer, asgi_client: tuple[httpx.AsyncClient, ContextStore, Scenario]
) -> None:
    client, store, _ = asgi_client
    assert (await client.get("/count", headers=KEY)).status_code == 200
    redis_server.kill()
    await eventually(lambda: not store.listener_connected, deadline=5.0)
    assert (await client.get("/needs", headers=KEY)).text == "1"  # within listener_liveness
    r = await client.get("/count", headers=KEY)
    assert (r.status_code, r.headers.get("retry-after")) == (503, "1")
    assert (await client.get("/count", headers={"X-Sticky-Key": "newcomer"})).status_code == 503
    # The failed write left the copy unverified and Redis cannot be asked: refused.
    assert (await client.get("/needs", headers=KEY)).status_code == 503
