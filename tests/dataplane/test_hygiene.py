"""HTTP hygiene at the edges (DESIGN.md P5, §3 "HTTP hygiene"): hop-by-hop fields are not
forwarded in either direction (RFC 9110 §7.6.1), request targets are normalised, and the
forms a reverse proxy does not serve are refused without contacting a backend."""

from __future__ import annotations

from aiohttp import web

from support.backends import respond_with
from support.http import http_request

HOP_BY_HOP_REQUEST = [
    ("Connection", "close, X-Foo"),
    ("X-Foo", "must-not-pass"),
    ("X-Bar", "passes"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
]


def _names(rec) -> set[str]:
    return {n.lower() for n, _ in rec.headers}


async def test_request_hop_by_hop_fields_are_not_forwarded(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    r = await p.exchange(
        http_request("GET", "/", headers=[("X-User-Id", "u")] + HOP_BY_HOP_REQUEST)
    )
    assert r.status == 200
    (rec,) = a.requests
    names = _names(rec)
    for gone in ("x-foo", "keep-alive", "proxy-connection", "te", "trailer", "proxy-authorization"):
        assert gone not in names, gone
    assert rec.one("X-Bar") == "passes"
    # the proxy's own hop to the backend is keep-alive: no "close" is passed on
    assert all("close" not in v.lower() for v in rec.values("Connection"))


async def test_connection_option_naming_host_does_not_strip_host(backends, proxy):
    """A field named by Connection is dropped, but a forwarded HTTP/1.1 request still needs
    exactly one Host (RFC 9112 §3.2). Either the proxy refuses such a request itself or it
    forwards it with its Host; it never sends a backend a request without one."""
    (a,) = await backends("a")
    p = await proxy([a])
    r = await p.exchange(
        http_request(
            "GET", "/", host="shop.example", headers=[("X-User-Id", "u"), ("Connection", "Host")]
        )
    )
    if not a.requests:
        assert r.status == 400 and r.body.startswith(b"400 Bad Request: ")
        return
    (rec,) = a.requests
    assert rec.values("Host") == ["shop.example"], f"forwarded head: {rec.headers!r}"
    assert r.status == 200


async def test_h2c_upgrade_is_never_forwarded_and_connection_keeps_parsing(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    c = await p.client()
    c.send(
        http_request(
            "GET",
            "/one",
            headers=[
                ("X-User-Id", "u"),
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ],
        )
    )
    r1 = await c.response()
    assert r1.status == 200  # answered as plain HTTP/1.1, no 101
    c.send(http_request("GET", "/two", headers={"X-User-Id": "u"}))
    r2 = await c.response()
    assert r2.status == 200
    c.close()
    assert [rec.target for rec in a.requests] == ["/one", "/two"]
    first = a.requests[0]
    assert not first.has("Upgrade")
    assert not first.has("HTTP2-Settings")
    assert all("upgrade" not in v.lower() for v in first.values("Connection"))


async def test_response_hop_by_hop_fields_are_not_forwarded(backends, proxy):
    (a,) = await backends("a")

    async def handler(request, rec):
        return web.Response(
            body=b"hello",
            headers=[
                ("Connection", "X-Internal"),
                ("X-Internal", "secret"),
                ("Keep-Alive", "timeout=99"),
                ("Proxy-Connection", "keep-alive"),
                ("Proxy-Authenticate", "Basic realm=x"),
                ("Trailer", "X-Sum"),
                ("Upgrade", "h2c"),
                ("X-Public", "yes"),
            ],
        )

    a.handler = handler
    p = await proxy([a])
    r = await p.get("/", user="u")
    assert r.status == 200 and r.body == b"hello"
    names = {n.lower() for n, _ in r.headers}
    for gone in (
        "x-internal",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ):
        assert gone not in names, gone
    assert r.one("X-Public") == "yes"


async def test_response_hop_by_hop_fields_are_matched_in_any_case(raw_backend, proxy):
    # names compared case-insensitively (RFC 9110 §5.1), whatever their first letter's case
    fields = (
        b"kEEP-aLIVE: timeout=1\r\nTE: trailers\r\nhttp2-SETTINGS: AAA\r\n"
        b"pROXY-authenticate: Basic\r\nuPGRADE: h2c\r\nCONNECTION: keep-alive\r\n"
        b"Tee: stays\r\nHttp-Thing: stays\r\nupgraded: stays\r\n"
    )
    be = await raw_backend(
        "a", respond_with(b"HTTP/1.1 200 OK\r\n" + fields + b"content-LENGTH: 2\r\n\r\nok")
    )
    p = await proxy([be])
    r = await p.get("/", user="u")
    assert r.status == 200 and r.body == b"ok"
    names = {n.lower() for n, _ in r.headers}
    for gone in ("keep-alive", "te", "http2-settings", "proxy-authenticate", "upgrade"):
        assert gone not in names, gone
    assert r.one("Tee") == "stays" and r.one("Http-Thing") == "stays"
    assert r.one("upgraded") == "stays" and r.one("Content-Length") == "2"


async def test_absolute_form_with_matching_host_is_rewritten_to_origin_form(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    raw = (
        b"GET http://Shop.Example:8080/cart/items?id=7&x=%20 HTTP/1.1\r\n"
        b"Host: shop.example:8080\r\nX-User-Id: u\r\n\r\n"
    )
    r = await p.exchange(raw)
    assert r.status == 200
    (rec,) = a.requests
    assert rec.target == "/cart/items?id=7&x=%20"
    assert rec.one("Host") == "shop.example:8080"


async def test_absolute_form_with_other_host_is_refused(raw_backend, proxy):
    be = await raw_backend("a", respond_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    p = await proxy([be])
    c = await p.client()
    c.send(b"GET http://evil.example/admin HTTP/1.1\r\nHost: shop.example\r\nX-User-Id: u\r\n\r\n")
    r = await c.response()
    assert r.status == 400
    assert await c.closed()
    assert be.raw == b""


async def test_connect_is_refused(raw_backend, proxy):
    be = await raw_backend("a", respond_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    p = await proxy([be])
    c = await p.client()
    c.send(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
    r = await c.response()
    assert r.status == 405
    assert await c.closed()
    assert be.raw == b""


async def test_asterisk_form_is_refused(raw_backend, proxy):
    be = await raw_backend("a", respond_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    p = await proxy([be])
    c = await p.client()
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    r = await c.response()
    assert r.status == 400
    assert await c.closed()
    assert be.raw == b""


async def test_error_responses_name_a_reason_and_are_not_cached(raw_backend, proxy):
    be = await raw_backend("a", respond_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    p = await proxy([be])
    r = await p.exchange(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert r.status == 400
    assert r.body.startswith(b"400 Bad Request: ") and b"Host" in r.body
    assert r.one("Cache-Control") == "no-store"
    assert r.wants_close


async def test_fragment_in_target_is_not_forwarded(raw_backend, proxy):
    be = await raw_backend("a", respond_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    p = await proxy([be])
    r = await p.exchange(b"GET /a?q=1#frag HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\n\r\n")
    if r.status == 400:
        assert be.raw == b""
        return
    assert r.status == 200
    assert [rec.target for rec in be.requests] == ["/a?q=1"]


async def test_absolute_form_with_default_port_matches_host_without_port(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    r = await p.exchange(
        b"GET http://shop.example:80/x HTTP/1.1\r\nHost: shop.example\r\nX-User-Id: u\r\n\r\n"
    )
    assert r.status == 200
    assert a.requests[0].target == "/x"
