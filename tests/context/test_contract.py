"""The proxy and the context library agree on what they share (stickyproxy/contract.py): the
header names, the idempotent methods, how a duration string reads; and the library's
"missing key" error names the header it was configured to read."""

from __future__ import annotations

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from stickyproxy import contract
from stickyproxy.config import Headers
from stickyproxy.context import ConfigError, StickyHeaders, context_middleware, get_context
from stickyproxy.context.errors import MissingUserKey
from stickyproxy.context.headers import DEFAULT_HEADERS
from stickyproxy.context.middleware_asgi import SCOPE_NAMES_KEY, sticky_context
from stickyproxy.context.retry import IDEMPOTENT_METHODS as LIBRARY_IDEMPOTENT
from stickyproxy.context.settings import parse_duration as library_duration
from stickyproxy.dataplane.http import IDEMPOTENT_METHODS as PROXY_IDEMPOTENT
from stickyproxy.units import parse_duration as proxy_duration


def test_the_library_reads_the_headers_the_proxy_sets_by_default():
    proxy = Headers()
    assert (proxy.key, proxy.backend, proxy.route, proxy.ring) == (
        DEFAULT_HEADERS.key,
        DEFAULT_HEADERS.backend,
        DEFAULT_HEADERS.route,
        DEFAULT_HEADERS.ring,
    )
    assert contract.header_names("X-App-") == (
        "X-App-Key",
        "X-App-Backend",
        "X-App-Route",
        "X-App-Ring",
    )


def test_both_sides_replay_the_same_methods():
    assert PROXY_IDEMPOTENT == LIBRARY_IDEMPOTENT == contract.IDEMPOTENT_METHODS
    assert "TRACE" in LIBRARY_IDEMPOTENT and "POST" not in LIBRARY_IDEMPOTENT


@pytest.mark.parametrize(
    "text, seconds", [("250ms", 0.25), ("2s", 2.0), ("1.5m", 90.0), ("1h", 3600.0), ("1d", 86400.0)]
)
def test_a_duration_string_reads_the_same_on_both_sides(text, seconds):
    assert proxy_duration(text) == library_duration(text, name="x") == seconds


@pytest.mark.parametrize("text", ["30", "1y", "", "2 seconds"])
def test_a_duration_string_refused_by_one_side_is_refused_by_both(text):
    with pytest.raises(ValueError):
        proxy_duration(text)
    with pytest.raises(ConfigError):
        library_duration(text, name="x")


async def test_get_context_names_the_configured_key_header(stores):
    store = await stores("A")
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            get_context(request)
        except MissingUserKey as e:
            seen.append(str(e))
            raise
        return web.Response(text="unreachable")

    names = StickyHeaders(key="X-App-User")
    app = web.Application(middlewares=[context_middleware(store, headers=names)])
    app.router.add_get("/", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/") as r:
            assert (r.status, await r.text()) == (400, "missing X-App-User header\n")
    finally:
        await server.close()
    assert seen == ["missing X-App-User header"]


def test_sticky_context_names_the_configured_key_header():
    with pytest.raises(MissingUserKey, match="X-App-User"):
        sticky_context({SCOPE_NAMES_KEY: StickyHeaders(key="X-App-User")})
    with pytest.raises(MissingUserKey, match="X-Sticky-Key"):
        sticky_context({})
