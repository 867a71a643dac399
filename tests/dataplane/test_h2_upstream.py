"""HTTP/2 to backends (``protocol = "h2"``, docs/http2.md): HTTP/1.1 and HTTP/2 clients
reach an HTTP/2 backend (support/h2backend.py, made with ``h2``) through one exchange
path. What is asserted: the request as the backend sees it (RFC 9113 §8.3: pseudo-header
fields, no connection-specific ones), bodies and trailers both ways, streams sharing a
connection, refused streams and GOAWAY retried like a reset, malformed or cut responses
never passed off as complete, flow control towards a slow client and from a backend that
does not read, the HTTP/2 health check, TLS with ALPN; and the pure translation
functions, table-tested."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import pytest
import trustme

from stickyproxy.config import ConfigError, loads
from stickyproxy.control.probe import grpc_health_request, grpc_serving_status
from stickyproxy.control.server import Service
from stickyproxy.dataplane import grpc as grpc_rules
from stickyproxy.dataplane.h2upstream import request_fields, response_head
from support.config import build_toml
from support.grpcbackend import channel, user
from support.h2backend import H2Backend
from support.http import Client, http_request
from support.net import IO_TIMEOUT, eventually

USERS = [f"user-{i}" for i in range(40)]


@pytest.fixture
async def h2_backends():
    started: list[H2Backend] = []

    async def start(*ids: str, ssl: ssl.SSLContext | None = None) -> list[H2Backend]:
        bs = [await H2Backend(i, ssl).start() for i in ids]
        started.extend(bs)
        return bs

    yield start
    for b in started:
        await b.stop()


def owned_by(p, bid: str) -> str:  # type: ignore[no-untyped-def]
    return next(u for u in USERS if p.pref(u)[0] == bid)


# ---------------------------------------------------------------------------------------
# the request and response as they cross


async def test_http11_request_reaches_h2_backend_as_rfc9113_head(h2_backends, proxy):
    (b,) = await h2_backends("h")
    p = await proxy([b])
    r = await p.get("/path?q=1", user="alice", headers={"Connection": "keep-alive"})
    assert r.status == 200, r
    seen = json.loads(r.body)
    assert seen["method"] == "GET" and seen["path"] == "/path?q=1"
    assert seen["scheme"] == "http" and seen["authority"]  # Host became :authority
    names = [n for n, _ in seen["headers"]]
    assert names[:4] == [":method", ":scheme", ":authority", ":path"]  # §8.3: first
    assert all(n == n.lower() for n in names)  # §8.2.1
    for banned in ("connection", "keep-alive", "transfer-encoding", "upgrade", "host"):
        assert banned not in names  # §8.2.2
    assert ["te", "trailers"] in seen["headers"]
    assert ["x-sticky-backend", "h"] in seen["headers"]
    # the backend's trailers reach an HTTP/1.1 client as the chunked trailer section
    assert r.framing == "chunked"
    assert ("x-trailer", "done") in [(n.lower(), v) for n, v in r.trailers]


async def test_request_body_and_trailers_reach_h2_backend(h2_backends, proxy):
    (b,) = await h2_backends("h")
    p = await proxy([b])
    c = await p.client()
    try:
        c.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nX-User-Id: a\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: x-req-trailer\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-req-trailer: 1\r\n\r\n"
        )
        r = await c.response()
    finally:
        c.close()
    seen = json.loads(r.body)
    assert seen["method"] == "POST" and seen["size"] == 11
    assert seen["trailers"] == {"x-req-trailer": "1"}
    assert bytes(b.requests[0].body) == b"hello world"


async def test_head_response_ends_at_its_head(h2_backends, proxy):
    (b,) = await h2_backends("h")
    p = await proxy([b])
    c = await p.client()
    try:
        for _ in range(2):  # and the client connection stays in step for the next one
            c.send(http_request("HEAD", "/", headers={"X-User-Id": "a"}))
            r = await c.response(head=True)
            assert r.status == 200 and r.body == b""
    finally:
        c.close()
    assert [s.field(b":method") for s in b.requests] == [b"HEAD", b"HEAD"]


async def test_concurrent_requests_share_one_connection(h2_backends, proxy):
    (b,) = await h2_backends("h")
    p = await proxy([b])
    rs = await asyncio.gather(*(p.get(f"/{i}", user=f"u{i}") for i in range(20)))
    assert [r.status for r in rs] == [200] * 20
    assert b.connections == 1  # streams, not connections


async def test_connections_retire_after_max_requests_and_close_when_idle(h2_backends, proxy):
    (b,) = await h2_backends("h")
    p = await proxy(
        [b], {"limits": {"pool_max_requests": 3}, "timeouts": {"upstream_idle": "0.3s"}}
    )
    for i in range(7):  # one at a time: streams 1-3, 4-6 and 7 on three connections
        assert (await p.get(f"/{i}", user="a")).status == 200
    assert b.connections == 3
    await eventually(lambda: not b.live, what="idle connections closed")


async def test_trailers_only_response_reaches_grpc_client_as_its_status(h2_backends, proxy):
    import grpc

    (b,) = await h2_backends("h")
    b.mode = "trailers-only"
    p = await proxy([b], {"listen": {"h2c": True}})
    async with channel(p.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/x.Y/Z")(b"", metadata=user("a"), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.details() == "denied"


# ---------------------------------------------------------------------------------------
# failures


async def test_refused_stream_is_retried_elsewhere_when_replayable(h2_backends, proxy):
    refusing, ok = await h2_backends("refusing", "ok")
    refusing.mode = "refuse"
    p = await proxy([refusing, ok])
    u = owned_by(p, "refusing")
    r = await p.get("/", user=u)
    assert r.status == 200 and json.loads(r.body)["backend"] == "ok"
    assert refusing.requests  # it was asked, and refused
    # a request with a body was streamed and cannot be replayed: 502 with the reason
    r = await p.get("/", user=u, method="POST", body=b"data")
    assert r.status == 502 and b"REFUSED_STREAM" in r.body, r.body


async def test_goaway_before_processing_moves_the_request(h2_backends, proxy):
    closing, ok = await h2_backends("closing", "ok")
    closing.mode = "goaway"
    p = await proxy([closing, ok])
    r = await p.get("/", user=owned_by(p, "closing"))
    assert r.status == 200 and json.loads(r.body)["backend"] == "ok"


async def test_streams_up_to_the_goaways_last_id_still_finish(h2_backends, proxy):
    (b,) = await h2_backends("h")
    b.mode = "drain"  # GOAWAY naming the stream in progress, then its answer
    p = await proxy([b])
    for i in range(2):
        r = await p.get(f"/{i}", user="a")
        assert r.status == 200 and json.loads(r.body)["path"] == f"/{i}"
    # the stream named by the GOAWAY was answered; the next request took a new connection
    assert b.connections == 2


async def test_body_shorter_than_its_content_length_is_a_502(h2_backends, proxy):
    (b,) = await h2_backends("h")
    b.mode = "short"  # content-length 10, 3 bytes: h2 refuses it before the head is relayed
    p = await proxy([b], {"retries": {"attempts": 0}})
    r = await p.get("/", user="a")
    assert r.status == 502 and b"protocol error" in r.body, r.body


async def test_stream_reset_mid_response_is_never_passed_off_as_complete(h2_backends, proxy):
    (b,) = await h2_backends("h")
    b.mode = "reset-mid"
    p = await proxy([b])
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(http_request("GET", "/", headers={"X-User-Id": "a"}))
    async with asyncio.timeout(IO_TIMEOUT):
        raw = await reader.read(-1)  # until the proxy closes the connection
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    assert b"partial" in body and not body.endswith(b"0\r\n\r\n")  # no last chunk


async def test_websocket_upgrade_to_h2_backend_is_refused_with_502(h2_backends, proxy):
    (b,) = await h2_backends("h")
    p = await proxy([b])
    r = await p.get(
        "/ws",
        user="a",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert r.status == 502 and b"HTTP/2 backend" in r.body


# ---------------------------------------------------------------------------------------
# flow control


async def test_slow_client_holds_the_backend_back(h2_backends, proxy):
    (b,) = await h2_backends("h")
    b.mode = "big"
    b.big_size = 64 * 1024 * 1024
    p = await proxy([b], {"timeouts": {"body_idle": "30s"}})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(http_request("GET", "/", headers={"X-User-Id": "a"}))
    # the client reads nothing: the backend's sending stops at a plateau (the stream
    # window, the proxy's buffers and the sockets'), far below the body's size
    last = -1

    def plateau() -> bool:
        nonlocal last
        same = b.sent == last and b.sent > 0
        last = b.sent
        return same

    await eventually(plateau, interval=0.3, deadline=20, what="backend stalled")
    assert b.sent < 32 * 1024 * 1024, b.sent
    total = 0
    async with asyncio.timeout(60):
        while total < b.big_size:
            data = await reader.read(1 << 20)
            assert data
            total += len(data)
    assert b.sent == b.big_size
    writer.close()


async def test_backend_not_reading_holds_the_client_back(h2_backends, proxy):
    (b,) = await h2_backends("h")
    b.hold_window = True
    p = await proxy([b], {"timeouts": {"body_idle": "30s", "response": "30s"}})
    size = 64 * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nX-User-Id: a\r\nContent-Length: %d\r\n\r\n" % size)
    sent = 0
    chunk = b"y" * 65536

    async def send() -> None:
        nonlocal sent
        while sent < size:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()

    task = asyncio.create_task(send())
    try:
        await eventually(lambda: b.requests and len(b.requests[0].body) >= 65535)
        last = -1

        def plateau() -> bool:
            nonlocal last
            same = sent == last
            last = sent
            return same

        await eventually(plateau, interval=0.3, deadline=20, what="client held back")
        # the backend got its window's worth; the client is stopped far from the end
        assert len(b.requests[0].body) == 65535
        assert sent < size // 2, sent
    finally:
        task.cancel()
        writer.close()


# ---------------------------------------------------------------------------------------
# health checks and TLS


async def test_http_health_check_speaks_http2(h2_backends, proxy):
    (b,) = await h2_backends("h")
    health = {"enabled": True, "path": "/healthz", "interval": "0.1s", "timeout": "0.1s"}
    health |= {"rise": 1, "fall": 1}
    p = await proxy([b], {"health": health})
    await eventually(lambda: any(s.field(b":path") == b"/healthz" for s in b.requests))
    st = p.svc.table.states["h"]
    assert st.healthy
    b.mode = "refuse"
    await eventually(lambda: not st.healthy, what="marked down")
    assert "REFUSED" in st.reason or "reset" in st.reason, st.reason


async def test_h2_backend_over_tls_by_alpn(h2_backends, tmp_path: Path):
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    ctx.set_alpn_protocols(["h2"])
    (b,) = await h2_backends("secure", ssl=ctx)
    plain = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(plain)
    plain.set_alpn_protocols(["http/1.1"])  # a TLS server that does not speak h2
    (old,) = await h2_backends("old", ssl=plain)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = build_toml([], {"retries": {"attempts": 0}})
    for x in (b, old):
        text += (
            f'[[backends]]\nid = "{x.id}"\nurl = "https://localhost:{x.port}"\n'
            f'protocol = "h2"\n[backends.tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
        )
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    svc = Service(loads(text, str(path)), str(path))
    await svc.start()
    try:
        ring = svc.table.router.ring
        for bid in ("secure", "old"):
            u = next(u for u in USERS if ring.owner(u) == bid)
            c = await Client.connect(svc.proxy.port)
            try:
                c.send(http_request("GET", "/", headers={"X-User-Id": u}))
                r = await c.response()
            finally:
                c.close()
            if bid == "secure":
                seen = json.loads(r.body)
                assert r.status == 200 and seen["scheme"] == "https"
            else:
                assert r.status == 502 and b"did not choose HTTP/2" in r.body, r.body
    finally:
        await svc.stop()


# ---------------------------------------------------------------------------------------
# configuration


def test_protocol_is_validated_by_key_path():
    with pytest.raises(ConfigError) as e:
        loads('[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\nprotocol = "h3"\n')
    assert 'backends[0].protocol: must be one of "http/1.1", "h2"' in str(e.value)


def test_grpc_health_needs_h2_backends():
    with pytest.raises(ConfigError) as e:
        loads('[health]\nkind = "grpc"\n[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n')
    assert 'health.kind: "grpc" needs backends[0] (a) to have protocol = "h2"' in str(e.value)


# ---------------------------------------------------------------------------------------
# pure translation, table-tested


@pytest.mark.parametrize(
    ("method", "target", "fields", "scheme", "expected"),
    [
        (
            b"GET",
            b"/a?b",
            [(b"Host", b"h:1"), (b"Accept", b"*/*")],
            b"http",
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"h:1"),
                (b":path", b"/a?b"),
                (b"accept", b"*/*"),
                (b"te", b"trailers"),
            ],
        ),
        (
            b"POST",
            b"/",
            [
                (b"Host", b"h"),
                (b"Connection", b"keep-alive"),
                (b"Keep-Alive", b"5"),
                (b"Transfer-Encoding", b"chunked"),
                (b"TE", b"trailers, deflate"),
                (b"Upgrade", b"x"),
                (b"Content-Type", b"application/grpc"),
            ],
            b"https",
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"h"),
                (b":path", b"/"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
        ),
        (
            b"OPTIONS",
            b"*",
            [(b"Host", b"h")],
            b"http",
            [
                (b":method", b"OPTIONS"),
                (b":scheme", b"http"),
                (b":authority", b"h"),
                (b":path", b"*"),
                (b"te", b"trailers"),
            ],
        ),
    ],
)
def test_request_fields(method, target, fields, scheme, expected):
    assert request_fields(method, target, fields, scheme) == expected


@pytest.mark.parametrize(
    ("headers", "ended", "head_only", "head", "framing"),
    [
        (
            [(b":status", b"200"), (b"content-type", b"text/plain")],
            False,
            False,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n",
            "chunked",
        ),
        (
            [(b":status", b"200"), (b"content-length", b"5")],
            False,
            False,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            "cl",
        ),
        (
            [(b":status", b"404")],
            True,
            False,
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            "none",
        ),
        (
            [(b":status", b"200"), (b"content-length", b"9")],
            True,
            True,
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            "none",
        ),
        (
            [(b":status", b"103"), (b"link", b"</a>")],
            False,
            False,
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
            "none",
        ),
        (
            # gRPC trailers-only: the status moves to the (empty) body's trailer section
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"7"),
                (b"grpc-message", b"no"),
            ],
            True,
            False,
            b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n"
            b"transfer-encoding: chunked\r\n\r\n0\r\ngrpc-status: 7\r\ngrpc-message: no\r\n\r\n",
            "none",
        ),
        (
            [(b":status", b"299"), (b"connection", b"close")],
            False,
            False,
            b"HTTP/1.1 299 -\r\ntransfer-encoding: chunked\r\n\r\n",
            "chunked",
        ),
    ],
)
def test_response_head(headers, ended, head_only, head, framing):
    assert response_head(headers, ended, head_only) == (head, framing)


@pytest.mark.parametrize(
    ("http_status", "code"),
    [(502, 14), (503, 14), (504, 4), (408, 4), (429, 8), (404, 12), (400, 13), (418, 2)],
)
def test_grpc_status_for_proxy_errors(http_status, code):
    assert grpc_rules.status_for(http_status) == code


@pytest.mark.parametrize(
    ("value", "grpc"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"Application/GRPC; charset=x", True),
        (b"application/grpc-web", False),
        (b"application/json", False),
        (None, False),
    ],
)
def test_is_grpc(value, grpc):
    assert grpc_rules.is_grpc(value) is grpc


def test_grpc_message_is_percent_encoded():
    assert grpc_rules.encode_message("backend b1 100% down\n\u00e9") == (
        b"backend b1 100%25 down%0A%C3%A9"
    )


@pytest.mark.parametrize(
    ("service", "message"),
    [("", b"\x00\x00\x00\x00\x00"), ("app", b"\x00\x00\x00\x00\x05\x0a\x03app")],
)
def test_grpc_health_request(service, message):
    assert grpc_health_request(service) == message


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00\x00\x00\x00\x02\x08\x01", 1),
        (b"\x00\x00\x00\x00\x02\x08\x02", 2),
        (b"\x00\x00\x00\x00\x00", 0),
    ],
)
def test_grpc_serving_status(data, status):
    assert grpc_serving_status(data) == status


@pytest.mark.parametrize(
    "data", [b"\x01\x00\x00\x00\x00", b"\x00\x00\x00\x00\x05\x08", b"\x00\x00\x00\x00\x01\x12"]
)
def test_grpc_serving_status_refuses_what_is_not_an_answer(data):
    with pytest.raises(ValueError):
        grpc_serving_status(data)
