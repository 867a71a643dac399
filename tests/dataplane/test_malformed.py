"""Malformed and over-limit requests (DESIGN.md P5; RFC 9112 §§2–7, RFC 9110 §5): each is
answered by the proxy itself with the status in the table, the connection is closed, and
no byte reaches a backend."""

from __future__ import annotations

import time

import pytest

from support.backends import respond_with
from support.net import eventually

LIMITS = {"max_request_line": 1024, "max_header_bytes": 4096, "max_headers": 20, "max_body": 1000}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
H = b"Host: shop.example\r\nX-User-Id: u\r\n"

CASES = [
    # framing: request smuggling vectors (RFC 9112 §6.1, §6.3)
    (
        "cl-and-te",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    (
        "te-and-cl",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        {400},
    ),
    (
        "duplicate-cl",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        {400},
    ),
    (
        "duplicate-cl-same",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        {400},
    ),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", {400}),
    ("cl-not-a-number", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n", {400}),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", {400}),
    ("cl-plus-sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", {400}),
    (
        "cl-overflow",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        {400, 413},
    ),
    (
        "te-gzip-chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        {400, 501},
    ),
    (
        "te-chunked-chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    (
        "te-two-fields",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    (
        "te-identity",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n",
        {400, 501},
    ),
    (
        "te-chunked-then-gzip",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        {400, 501},
    ),
    (
        "te-in-http10",
        b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    # field syntax (RFC 9110 §5.5, RFC 9112 §5)
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n", {400}),
    ("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", {400}),
    ("del-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", {400}),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", {400}),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", {400}),
    ("ctl-in-name", b"GET / HTTP/1.1\r\n" + H + b"X\x01A: a\r\n\r\n", {400}),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : a\r\n\r\n", {400}),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n", {400}),
    ("bare-lf-line-ends", b"GET / HTTP/1.1\nHost: shop.example\nX-User-Id: u\n\n", {400}),
    # request line
    ("bad-method-chars", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", {400, 501}),
    ("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", {400, 501}),
    ("http-3.0", b"GET / HTTP/3.0\r\n" + H + b"\r\n", {400, 505}),
    ("http-2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", {400, 505}),
    ("http-4.0", b"GET / HTTP/4.0\r\n" + H + b"\r\n", {400, 505}),
    (
        "connect-origin-form",
        b"CONNECT /early HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        {405},
    ),
    (
        "connect-authority-form",
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\nX-User-Id: u\r\n\r\n",
        {405},
    ),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("relative-target", b"GET a/b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    # Host (RFC 9112 §3.2)
    ("missing-host", b"GET / HTTP/1.1\r\nX-User-Id: u\r\n\r\n", {400}),
    ("duplicate-host", b"GET / HTTP/1.1\r\n" + H + b"Host: other.example\r\n\r\n", {400}),
    ("host-with-space", b"GET / HTTP/1.1\r\nHost: shop example\r\nX-User-Id: u\r\n\r\n", {400}),
    (
        "host-with-path",
        b"GET / HTTP/1.1\r\nHost: shop.example/admin\r\nX-User-Id: u\r\n\r\n",
        {400},
    ),
    (
        "host-with-userinfo",
        b"GET / HTTP/1.1\r\nHost: user@shop.example\r\nX-User-Id: u\r\n\r\n",
        {400},
    ),
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: shop.example:80x\r\nX-User-Id: u\r\n\r\n", {400}),
    # limits
    ("request-line-too-long", b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n" + H + b"\r\n", {414}),
    ("header-too-large", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 5000 + b"\r\n\r\n", {431}),
    (
        "too-many-headers",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-H%d: v\r\n" % i for i in range(25)) + b"\r\n",
        {431},
    ),
    (
        "body-too-large-cl",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 2000\r\n\r\n" + b"x" * 2000,
        {413},
    ),
    (
        "body-too-large-chunked",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n7d0\r\n"
        + b"x" * 2000
        + b"\r\n0\r\n\r\n",
        {413},
    ),
    # keys
    ("key-with-control-char", b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: a\tb\r\n\r\n", {400}),
    ("key-too-long", b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: " + b"k" * 300 + b"\r\n\r\n", {400}),
    ("key-not-utf8", b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: \xff\xfe\r\n\r\n", {400}),
]


@pytest.fixture
async def guarded(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"limits": LIMITS})
    return p, be


@pytest.mark.parametrize("raw, statuses", [pytest.param(r, s, id=i) for i, r, s in CASES])
async def test_malformed_request_is_refused_without_reaching_a_backend(guarded, raw, statuses):
    p, be = guarded
    c = await p.client()
    c.send(raw)
    r = await c.response()
    assert r.status in statuses, r.body
    assert r.body.startswith(f"{r.status} ".encode()) and b": " in r.body  # a reason
    assert r.wants_close
    assert await c.closed()
    assert be.raw == b""
    # and the proxy still serves the next client
    ok = await p.get("/", user="u")
    assert ok.status == 200 and ok.body == b"ok"


async def test_well_formed_requests_in_the_same_shapes_pass(guarded):
    """The table's near misses that are valid, so the table is not passing by refusing all."""
    p, be = guarded
    for raw in [
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"X-A: a\tb\r\n\r\n",
        b"GET /" + b"a" * 900 + b" HTTP/1.1\r\n" + H + b"\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-H%d: v\r\n" % i for i in range(15)) + b"\r\n",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\n" + b"x" * 1000,
        b"GET / HTTP/1.0\r\nX-User-Id: u\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\nX-User-Id: u\r\n\r\n",
    ]:
        r = await p.exchange(raw)
        assert r.status == 200, (raw[:60], r.body)
    assert len(be.requests) == 8


async def test_oversized_body_announced_up_front_is_refused_before_it_is_sent(guarded):
    p, be = guarded
    c = await p.client()
    c.send(b"PUT /big HTTP/1.1\r\n" + H + b"Content-Length: 10000000\r\n\r\n")
    r = await c.response()
    assert r.status == 413
    assert await c.closed()
    assert be.raw == b""


async def test_chunked_body_growing_past_the_limit_is_cut_off(guarded):
    p, be = guarded
    c = await p.client()
    c.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        c.send(b"190\r\n" + b"y" * 400 + b"\r\n")  # 3 × 400 > 1000
    r = await c.response()
    assert r.status == 413
    assert await c.closed()
    # at most the part under the limit may have been streamed, never the whole body
    assert b"y" * 1001 not in be.raw


BAD_CHUNKED = (
    b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
)


async def test_malformed_chunked_body_is_answered_400_at_once(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"timeouts": {"response": "900ms"}})
    c = await p.client()
    t0 = time.monotonic()
    c.send(BAD_CHUNKED)
    r = await c.response()
    assert time.monotonic() - t0 < 0.6, "the client waited for a backend timeout"
    assert r.status == 400
    assert await c.closed()
    # the backend must not be left waiting with a half request: a connection that carried
    # any of it is closed (one that carried nothing may stay pooled)
    await eventually(lambda: all(conn.eof or not conn.raw for conn in be.connections))


async def test_malformed_request_bodies_do_not_eject_the_backend(raw_backend, backends, proxy):
    (other,) = await backends("other")
    be = await raw_backend("owner", respond_with(OK))
    p = await proxy(
        [be, other], {"timeouts": {"response": "200ms"}, "passive": {"consecutive_failures": 3}}
    )
    user = next(f"user-{i}" for i in range(1000) if p.pref(f"user-{i}")[0] == "owner")
    bad = BAD_CHUNKED.replace(b"X-User-Id: u", b"X-User-Id: " + user.encode())
    for _ in range(3):
        c = await p.client()
        c.send(bad)
        r = await c.response()
        assert 400 <= r.status < 600
        c.close()
    r = await p.get("/", user=user)
    assert r.status == 200
    assert r.body == b"ok", "the user was moved off a healthy owner"
