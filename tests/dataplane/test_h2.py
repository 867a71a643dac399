"""HTTP/2 from clients (docs/http2.md): streams routed and forwarded like HTTP/1.1
requests, by prior knowledge (listen.h2c) and by ALPN over TLS; limits and the known
HTTP/2 floods; GOAWAY on shutdown.

Clients are made with the ``h2`` library over real sockets (``H2Client`` below), backends
are the suite's aiohttp backends; frames a conforming client would never send are built
with hyperframe and written raw.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import ssl
import subprocess
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import trustme
from aiohttp import web
from h2.connection import ConnectionInputs, ConnectionState
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

from stickyproxy.dataplane import h2client
from stickyproxy.dataplane.h2client import (
    Malformed,
    check_trailers,
    parse_request_head,
    response_fields,
)
from stickyproxy.dataplane.http import RequestError
from support.backends import respond_with
from support.http import http_request
from support.metrics import Metrics
from support.net import IO_TIMEOUT, eventually

H2C = {"listen": {"h2c": True}}


# ---------------------------------------------------------------------------------------
# a small HTTP/2 client over asyncio


@dataclass
class Reply:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    got_headers: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def field(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class H2Client:
    """One HTTP/2 connection: requests by stream id, replies collected by a reader task.
    ``auto_credit=False`` leaves DATA unacknowledged (the client's windows stay shut)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h2.connection.H2Connection,
        auto_credit: bool,
    ):
        self.reader, self.writer, self.conn = reader, writer, conn
        self.auto_credit = auto_credit
        self.replies: dict[int, Reply] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.remote_settings = asyncio.Event()
        self.pings_acked = 0
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        ctx: ssl.SSLContext | None = None,
        settings: dict[int, int] | None = None,
        auto_credit: bool = True,
        validate: bool = True,
    ) -> H2Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
            ),
            IO_TIMEOUT,
        )
        if ctx is not None:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        cfg = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        conn = h2.connection.H2Connection(config=cfg)
        # h2 refuses every frame after a GOAWAY it receives or sends; RFC 9113 §6.8 lets
        # the streams already taken finish, which is what the GOAWAY tests read
        sm = conn.state_machine
        sm._transitions = {
            **sm._transitions,
            **{
                (ConnectionState.CLIENT_OPEN, goaway): (None, ConnectionState.CLIENT_OPEN)
                for goaway in (ConnectionInputs.RECV_GOAWAY, ConnectionInputs.SEND_GOAWAY)
            },
        }
        if settings:
            conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        return cls(reader, writer, conn, auto_credit)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.conn.receive_data(data):
                    self._event(ev)
                self.writer.write(self.conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError, ssl.SSLError):
            pass
        finally:
            self.closed.set()
            for r in self.replies.values():
                r.done.set()
                r.got_headers.set()

    def _event(self, ev: Any) -> None:
        r = self.replies.get(getattr(ev, "stream_id", 0) or 0)
        if isinstance(ev, h2.events.ResponseReceived):
            r.headers = ev.headers
            r.got_headers.set()
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            r.informational.append(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            r.body += ev.data
            if self.auto_credit:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            r.trailers = ev.headers
        elif isinstance(ev, h2.events.StreamEnded):
            r.ended = True
            r.done.set()
        elif isinstance(ev, h2.events.StreamReset):
            if r is not None:
                r.reset = ev.error_code
                r.done.set()
                r.got_headers.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.remote_settings.set()
        elif isinstance(ev, h2.events.PingAckReceived):
            self.pings_acked += 1

    def request(
        self,
        path: str = "/",
        *,
        user: str | None = None,
        method: str = "GET",
        body: bytes | None = None,
        extra: list[tuple[str, str]] | None = None,
        end: bool = True,
        authority: str = "shop",
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
        ]
        if user is not None:
            headers.append(("x-user-id", user))
        headers += extra or []
        self.replies[sid] = Reply()
        self.conn.send_headers(
            sid, [(k.encode(), v.encode()) for k, v in headers], end_stream=end and body is None
        )
        if body is not None:
            self.send_body(sid, body, end=end)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, *, end: bool) -> None:
        """As much of ``body`` as the windows allow now (tests keep bodies within them,
        or use ``upload``)."""
        self.conn.send_data(sid, body, end_stream=end)
        self.flush()

    async def upload(self, sid: int, body: bytes) -> None:
        """Send ``body`` on ``sid`` as the server's windows open, then END_STREAM."""
        pos = 0
        while pos < len(body):
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                await asyncio.sleep(0.005)
                continue
            self.conn.send_data(sid, body[pos : pos + window])
            pos += window
            self.flush()
            await self.writer.drain()
        self.conn.end_stream(sid)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def raw(self, data: bytes) -> None:
        self.flush()
        self.writer.write(data)

    async def reply(self, sid: int, timeout: float = IO_TIMEOUT) -> Reply:
        r = self.replies[sid]
        await asyncio.wait_for(r.done.wait(), timeout)
        return r

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


@pytest.fixture
async def clients():
    made: list[H2Client] = []

    async def connect(port: int, **kw: Any) -> H2Client:
        c = await H2Client.connect(port, **kw)
        made.append(c)
        return c

    yield connect
    for c in made:
        await c.close()


# ---------------------------------------------------------------------------------------
# the request head: pure (RFC 9113 §8.2, §8.3)

BASE = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"shop"),
    (b":path", b"/a?b=1"),
]


@pytest.mark.parametrize(
    "headers, why",
    [
        (BASE + [(b"connection", b"keep-alive")], "connection-specific field connection"),
        (
            BASE + [(b"transfer-encoding", b"chunked")],
            "connection-specific field transfer-encoding",
        ),
        (BASE + [(b"upgrade", b"h2c")], "connection-specific field upgrade"),
        (BASE + [(b"keep-alive", b"5")], "connection-specific field keep-alive"),
        (BASE + [(b"proxy-connection", b"x")], "connection-specific field proxy-connection"),
        (BASE + [(b"te", b"gzip")], "te other than"),
        (BASE + [(b"X-Upper", b"1")], "invalid field name"),
        (BASE + [(b"a b", b"1")], "invalid field name"),
        (BASE + [(b"x", b"a\r\nInjected: 1")], "control character"),
        (BASE + [(b"x", b"a\x00")], "control character"),
        (BASE + [(b"x", b" padded")], "whitespace"),
        ([(b"x", b"1")] + BASE, "pseudo-header field after a regular field"),
        (BASE + [(b"x", b"1"), (b":method", b"GET")], "pseudo-header field after"),
        (BASE[:1] + BASE, "repeated pseudo-header field :method"),
        (BASE + [(b":protocol", b"websocket")], "unknown pseudo-header field"),
        ([(b":protocol", b"websocket")] + BASE, "unknown pseudo-header field"),
        (BASE[1:], "no :method"),
        ([(b":method", b"get")] + BASE[1:], "invalid :method"),
        (BASE[:3], "no :scheme or :path"),
        (BASE[:3] + [(b":path", b"")], "no :scheme or :path"),
        (BASE[:3] + [(b":path", b"http://shop/")], "invalid :path"),
        (BASE[:3] + [(b":path", b"/a b")], "invalid :path"),
        (
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"u@shop"),
                (b":path", b"/"),
            ],
            "userinfo",
        ),
        (BASE + [(b"host", b"other")], "Host and :authority differ"),
        (
            [(b":method", b"CONNECT"), (b":authority", b"h:1"), (b":path", b"/")],
            "malformed CONNECT",
        ),
    ],
)
def test_malformed_request_heads(headers, why):
    with pytest.raises(Malformed, match=why):
        parse_request_head(headers)


def test_request_head_parts():
    head = parse_request_head(
        BASE
        + [
            (b"te", b"trailers"),
            (b"host", b"SHOP"),
            (b"content-length", b"3"),
            (b"x-user-id", b"u1"),
        ]
    )
    assert (head.method, head.path, head.host) == ("GET", b"/a?b=1", b"shop")
    assert head.fields == [(b"te", b"trailers"), (b"content-length", b"3"), (b"x-user-id", b"u1")]
    assert head.content_length and head.refusal is None
    # no :authority: the Host field names the target (RFC 9113 §8.3.1)
    head = parse_request_head(
        [(b":method", b"PURGE"), (b":scheme", b"http"), (b":path", b"*"), (b"host", b"h")]
    )
    assert (head.method, head.path, head.host, head.fields) == ("PURGE", b"*", b"h", [])
    # CONNECT is well-formed HTTP/2 but refused as over HTTP/1.1 (docs/design.md §7b)
    head = parse_request_head([(b":method", b"CONNECT"), (b":authority", b"h:443")])
    assert isinstance(head.refusal, RequestError) and head.refusal.status == 405


def test_trailers_and_response_fields():
    assert check_trailers([(b"x-checksum", b"1")]) == [(b"x-checksum", b"1")]
    with pytest.raises(Malformed):
        check_trailers([(b":status", b"200")])
    with pytest.raises(Malformed):
        check_trailers([(b"connection", b"close")])
    assert response_fields(
        200,
        [
            (b"Content-Type", b"t"),
            (b"Connection", b"close"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Keep-Alive", b"5"),
            (b"Content-Length", b"3"),
        ],
    ) == [(b":status", b"200"), (b"content-type", b"t"), (b"content-length", b"3")]


# ---------------------------------------------------------------------------------------
# streams routed like requests

USERS = [f"user-{i}" for i in range(60)]


async def test_streams_on_one_connection_route_like_http1(backends, proxy, clients):
    bs = await backends("a", "b", "c")
    p = await proxy(bs, H2C)
    c = await clients(p.port)
    sids = {u: c.request(f"/r/{u}", user=u) for u in USERS}  # all at once: concurrent
    for u, sid in sids.items():
        r = await c.reply(sid)
        assert r.status == 200 and r.reset is None, (u, r)
        assert r.field(b"x-backend").decode() == p.pref(u)[0], u
        assert r.body.decode() == f"{p.pref(u)[0]} GET /r/{u}\n"
    # HTTP/1.1 clients of the same proxy get the same backends
    for u in USERS[:10]:
        resp = await p.get("/h1", user=u)
        assert resp.status == 200 and resp.one("X-Backend") == p.pref(u)[0]
    # what the backends received: HTTP/1.1, the proxy's contract headers, Host from
    # :authority, nothing connection-specific
    recs = [rec for b in bs for rec in b.requests if rec.target.startswith("/r/")]
    assert len(recs) == len(USERS)
    for rec in recs:
        assert rec.version == "1.1"
        assert rec.one("Host") == "shop"
        assert rec.one("X-Sticky-Key") == rec.target.rsplit("/", 1)[1]
        assert rec.one("X-Sticky-Backend") == rec.backend
        assert rec.one("X-Sticky-Route") == "primary"
        assert rec.one("X-Forwarded-Proto") == "http"
        assert rec.get("Transfer-Encoding") is None and rec.body == b""


async def test_streams_are_counted_and_logged_like_requests(backends, proxy, clients, caplog):
    caplog.set_level(logging.INFO, logger="stickyproxy.access")
    bs = await backends("a", "b")
    p = await proxy(
        bs,
        {
            **H2C,
            "admin": {"enabled": True, "port": 0},
            "logging": {"access": "json", "access_key": "raw"},
        },
    )
    c = await clients(p.port)
    sids = [c.request(f"/m/{u}", user=u) for u in USERS[:7]]
    replies = [await c.reply(sid) for sid in sids]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "stickyproxy.access"]
    assert sorted(rec["key"] for rec in lines) == sorted(USERS[:7])
    for rec, r in zip(
        sorted(lines, key=lambda x: x["path"]), sorted(replies, key=lambda x: bytes(x.body))
    ):
        assert rec["status"] == 200 and rec["client"] == "127.0.0.1"
        assert rec["backend"] == p.pref(rec["key"])[0] and rec["route"] == "primary"
        assert rec["bytes"] == len(r.body)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{p.svc.admin.port}/metrics") as resp:
            m = Metrics(await resp.text())
    assert m.total("stickyproxy_requests_total") == 7
    assert m.value("stickyproxy_client_connections") == 1  # one connection, 7 streams


@pytest.mark.slow
async def test_idle_connection_is_closed_with_goaway(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], {**H2C, "timeouts": {"client_idle": "1s"}})
    c = await clients(p.port)
    assert (await c.reply(c.request("/", user="u"))).status == 200
    await asyncio.wait_for(c.closed.wait(), 4)
    assert c.goaway is not None and c.goaway.error_code == ErrorCodes.NO_ERROR
    assert c.goaway.last_stream_id == 1


async def test_key_sources_apply_to_streams(backends, proxy, clients):
    """Cookie crumbs (RFC 9113 §8.2.3) are joined before the cookie key source reads
    them; query and path sources read :path."""
    bs = await backends("a", "b", "c")
    p = await proxy(
        bs,
        {
            **H2C,
            "routing": {
                "keys": [
                    {"from": "cookie", "name": "uid"},
                    {"from": "query", "name": "user"},
                    {"from": "path", "pattern": "^/u/(?P<key>[^/]+)"},
                ],
                "no_key": "reject",
            },
        },
    )
    c = await clients(p.port)
    cases = {
        "k-cookie": c.request("/", extra=[("cookie", "a=1"), ("cookie", "uid=k-cookie")]),
        "k-query": c.request("/x?user=k-query"),
        "k-path": c.request("/u/k-path/orders"),
    }
    for key, sid in cases.items():
        r = await c.reply(sid)
        assert r.status == 200 and r.field(b"x-backend").decode() == p.pref(key)[0], key
    sent = {rec.one("X-Sticky-Key"): rec for b in bs for rec in b.requests}
    assert sent["k-cookie"].one("Cookie") == "a=1; uid=k-cookie"


async def test_h2c_disabled_is_refused_as_http1(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a])
    resp = await p.exchange(h2client.PREFACE)
    assert resp.status == 400
    assert not a.requests


async def test_http1_still_served_when_h2c_enabled(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    resp = await p.get("/x", user="u1")
    assert resp.status == 200 and resp.body == b"a GET /x\n"


async def test_request_body_with_and_without_length(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    c = await clients(p.port)
    s1 = c.request("/up", user="u1", method="POST", body=b"hello", extra=[("content-length", "5")])
    s2 = c.request("/up", user="u1", method="POST", body=b"chunked-body", end=False)
    c.conn.send_headers(s2, [(b"x-sum", b"42")], end_stream=True)  # request trailers
    c.flush()
    r1, r2 = await c.reply(s1), await c.reply(s2)
    assert (r1.status, bytes(r1.body)) == (200, b"hello")
    assert (r2.status, bytes(r2.body)) == (200, b"chunked-body")
    by_target = {rec.body: rec for rec in a.requests}
    assert by_target[b"hello"].one("Content-Length") == "5"
    rec2 = by_target[b"chunked-body"]
    assert rec2.one("Transfer-Encoding") == "chunked"


async def test_head_and_no_content_responses_end_the_stream(backends, proxy, clients):
    (a,) = await backends("a")

    async def handler(request, rec):
        if rec.target == "/empty":
            return web.Response(status=204)
        return web.Response(body=b"x" * 100)

    a.handler = handler
    p = await proxy([a], H2C)
    c = await clients(p.port)
    s1 = c.request("/", user="u", method="HEAD")
    s2 = c.request("/empty", user="u")
    r1, r2 = await c.reply(s1), await c.reply(s2)
    assert r1.status == 200 and r1.field(b"content-length") == b"100" and not r1.body
    assert r2.status == 204 and not r2.body and r2.ended


async def test_backend_trailers_and_transfer_codings(raw_backend, proxy, clients):
    """Chunked trailers from the backend become a trailing HEADERS frame; a transfer coding
    HTTP/2 cannot carry (gzip applied as a transfer coding) resets the stream."""

    def answer(req):
        if req.target == "/gz":
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n"
            )
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n"
        )

    be = await raw_backend("a", respond_with(answer))
    p = await proxy([be], H2C)
    c = await clients(p.port)
    r = await c.reply(c.request("/t", user="u"))
    assert r.status == 200 and bytes(r.body) == b"hello"
    assert r.trailers == [(b"x-sum", b"42")]
    assert r.field(b"trailer") is None and r.field(b"transfer-encoding") is None
    r = await c.reply(c.request("/gz", user="u"))
    assert r.reset == ErrorCodes.INTERNAL_ERROR


async def test_expect_100_continue_is_relayed(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    c = await clients(p.port)
    sid = c.request(
        "/up",
        user="u",
        method="POST",
        end=False,
        extra=[("expect", "100-continue"), ("content-length", "4")],
    )
    await eventually(lambda: c.replies[sid].informational, what="100 Continue")
    assert c.replies[sid].informational[0][0] == (b":status", b"100")
    c.send_body(sid, b"data", end=True)
    r = await c.reply(sid)
    assert r.status == 200 and bytes(r.body) == b"data"


async def test_proxy_errors_reach_the_stream(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], {**H2C, "routing": {"no_key": "reject"}})
    c = await clients(p.port, validate=False)
    r = await c.reply(c.request("/"))  # no user key
    assert r.status == 400 and b"no user key" in r.body
    r = await c.reply(c.request("/", user="u", method="CONNECT"))
    assert r.reset == ErrorCodes.PROTOCOL_ERROR  # CONNECT with :path is malformed
    await a.stop()
    r = await c.reply(c.request("/", user="u"))
    assert r.status in (502, 503)
    assert not c.closed.is_set()  # stream errors, not connection errors


async def test_connection_specific_field_is_a_stream_error(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    c = await clients(p.port, validate=False)
    bad = c.request("/", user="u", extra=[("connection", "keep-alive")])
    r = await c.reply(bad)
    assert r.reset == ErrorCodes.PROTOCOL_ERROR
    # the connection goes on: only that stream was refused (RFC 9113 §8.1.1)
    ok = await c.reply(c.request("/", user="u", extra=[("te", "trailers")]))
    assert ok.status == 200
    assert len(a.requests) == 1 and a.requests[0].get("Te") is None
    # trailers are held to the same rules, and may carry no pseudo-header field
    sid = c.request("/", user="u", method="POST", body=b"x", end=False)
    c.conn.send_headers(sid, [(b":path", b"/other")], end_stream=True)
    c.flush()
    assert (await c.reply(sid)).reset == ErrorCodes.PROTOCOL_ERROR


async def test_header_limits(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], {**H2C, "limits": {"max_headers": 10}})
    c = await clients(p.port)
    r = await c.reply(c.request("/", user="u", extra=[(f"x-{i}", "v") for i in range(20)]))
    assert r.status == 431
    assert not a.requests
    await eventually(c.remote_settings.is_set, what="server SETTINGS")
    assert c.conn.remote_settings.max_concurrent_streams == h2client.MAX_CONCURRENT_STREAMS
    assert c.conn.remote_settings.max_header_list_size >= p.config.limits.max_header_bytes


# ---------------------------------------------------------------------------------------
# flow control, both ways

CHUNK = bytes(range(256)) * 256  # 64 KiB


async def _big_download(request, rec):
    n = int(rec.target.rsplit("/", 1)[1])
    resp = web.StreamResponse()  # chunked from the backend
    await resp.prepare(request)
    for _ in range(n // len(CHUNK)):
        await resp.write(CHUNK)
    return resp


async def _digest_upload(request, rec):
    h = hashlib.sha256()
    total = 0
    async for piece in request.content.iter_chunked(1 << 16):
        h.update(piece)
        total += len(piece)
    return web.Response(text=f"{total} {h.hexdigest()}")


@pytest.mark.slow
async def test_large_bodies_flow_both_ways(backends, proxy, clients):
    (a,) = await backends("a")
    a.read_body = False

    async def handler(request, rec):
        if request.method == "GET":
            return await _big_download(request, rec)
        return await _digest_upload(request, rec)

    a.handler = handler
    p = await proxy([a], H2C)
    c = await clients(p.port)
    n = 4 << 20
    down = [c.request(f"/down/{n}", user=f"u{i}") for i in range(3)]
    body = CHUNK * 48  # 3 MiB, far beyond every window
    up = c.request("/up", user="u", method="PUT", end=False)
    await c.upload(up, body)
    for sid in down:
        r = await c.reply(sid, timeout=30)
        assert r.status == 200 and r.ended and len(r.body) == n
        assert bytes(r.body[: len(CHUNK)]) == CHUNK
    r = await c.reply(up, timeout=30)
    assert r.body.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"


@pytest.mark.slow
async def test_response_waits_for_the_clients_window(backends, proxy, clients):
    """A client that does not open its windows gets no more than they allow; the upstream
    stops being read; once it opens them the whole body arrives."""
    (a,) = await backends("a")
    a.handler = _big_download
    p = await proxy([a], {**H2C, "timeouts": {"body_idle": "5s"}})
    c = await clients(p.port, auto_credit=False)
    n = 2 << 20
    sid = c.request(f"/down/{n}", user="u")
    r = c.replies[sid]
    await eventually(lambda: len(r.body) >= 65535, what="the first window's worth")
    await asyncio.sleep(0.3)
    assert len(r.body) == 65535  # the stream window, not a byte more
    c.auto_credit = True
    c.conn.acknowledge_received_data(len(r.body), sid)
    c.flush()
    await c.reply(sid, timeout=20)
    assert len(r.body) == n and r.ended


@pytest.mark.slow
async def test_zero_window_stall_is_reset_at_the_deadline(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], {**H2C, "timeouts": {"body_idle": "1s"}})
    c = await clients(p.port, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    sid = c.request("/", user="u")
    r = await c.reply(sid, timeout=5)
    assert r.status == 200 and r.reset == ErrorCodes.CANCEL and not r.body
    ok = c.request("/", user="u")  # the connection itself is fine
    c.conn.increment_flow_control_window(65535, ok)
    c.flush()
    assert (await c.reply(ok)).ended


@pytest.mark.slow
async def test_connection_window_stall_closes_the_connection(backends, proxy, clients):
    """Streams may receive, the connection may not (its window is never opened): after
    body_idle the connection is closed, not each stream reset in turn."""
    (a,) = await backends("a")
    a.handler = _big_download
    p = await proxy([a], {**H2C, "timeouts": {"body_idle": "1s"}})
    c = await clients(
        p.port, auto_credit=False, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
    )
    sids = [c.request(f"/down/{256 << 10}", user=f"u{i}") for i in range(2)]
    await asyncio.wait_for(c.closed.wait(), 5)
    assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert sum(len(c.replies[s].body) for s in sids) == 65535  # the connection window


@pytest.mark.slow
async def test_a_slow_moving_download_is_not_a_stall(backends, proxy, clients):
    """Windows opened a little at a time, for longer than body_idle: never reset."""
    (a,) = await backends("a")
    a.handler = _big_download
    p = await proxy([a], {**H2C, "timeouts": {"body_idle": "1s"}})
    c = await clients(p.port, auto_credit=False)
    n = 1 << 20
    sid = c.request(f"/down/{n}", user="u")
    r = c.replies[sid]
    credited = 0
    deadline = asyncio.get_running_loop().time() + 15
    while not r.done.is_set():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)  # the pace of the test: 640 KiB/s at most
        got = len(r.body) - credited
        if got:
            c.conn.acknowledge_received_data(got, sid)
            credited += got
            c.flush()
    assert r.reset is None and len(r.body) == n


# ---------------------------------------------------------------------------------------
# the known floods


async def _slow(request, rec):
    await asyncio.sleep(2)
    return web.Response(text="late")


async def test_rapid_reset_is_answered_with_enhance_your_calm(backends, proxy, clients):
    (a,) = await backends("a")
    a.handler = _slow
    p = await proxy([a], H2C)
    c = await clients(p.port)
    for i in range(h2client.MAX_RESETS + 20):
        sid = c.request("/", user=f"u{i}")
        c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
        if c.goaway is not None or c.closed.is_set():
            break
    await asyncio.wait_for(c.closed.wait(), IO_TIMEOUT)
    assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


async def test_continuation_flood_closes_the_connection(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    c = await clients(p.port)
    block = Encoder().encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
    )
    out = [HeadersFrame(1, data=block).serialize()]  # no END_HEADERS
    junk = Encoder().encode([(b"x-pad", b"p" * 8000)])
    out += [ContinuationFrame(1, data=junk).serialize() for _ in range(40)]
    c.raw(b"".join(out))
    await asyncio.wait_for(c.closed.wait(), IO_TIMEOUT)
    assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert not a.requests


@pytest.mark.parametrize(
    "frame",
    [
        lambda i: PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize(),
        lambda i: SettingsFrame(
            0, settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096 + i}
        ).serialize(),
    ],
    ids=["ping", "settings"],
)
async def test_control_frame_floods_are_bounded(backends, proxy, clients, frame):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    c = await clients(p.port)
    c.raw(b"".join(frame(i) for i in range(h2client.MAX_PINGS + h2client.MAX_SETTINGS + 50)))
    await asyncio.wait_for(c.closed.wait(), IO_TIMEOUT)
    assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


async def test_a_few_pings_and_settings_are_answered(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    c = await clients(p.port)
    for i in range(5):
        c.conn.ping(i.to_bytes(8, "big"))
    c.flush()
    await eventually(lambda: c.pings_acked == 5, what="PING ACKs")
    assert (await c.reply(c.request("/", user="u"))).status == 200


async def test_malformed_flood_closes_the_connection(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], H2C)
    c = await clients(p.port, validate=False)
    for _ in range(0, h2client.MAX_MALFORMED + 20, 20):
        # in batches the server has refused before the next: h2 counts a stream as open
        # until the proxy resets it, and past SETTINGS_MAX_CONCURRENT_STREAMS in one read
        # it would close the connection itself (PROTOCOL_ERROR)
        batch = [c.request("/", user="u", extra=[("connection", "x")]) for _ in range(20)]
        await eventually(
            lambda b=batch: c.closed.is_set() or all(c.replies[sid].reset is not None for sid in b),
            what="streams refused",
        )
        if c.closed.is_set():
            break
    await asyncio.wait_for(c.closed.wait(), IO_TIMEOUT)
    assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM, (
        c.goaway,
        p.svc.proxy.stopping,
    )


async def test_oversized_header_list_is_refused(backends, proxy, clients):
    (a,) = await backends("a")
    p = await proxy([a], {**H2C, "limits": {"max_header_bytes": 8192, "max_request_line": 4096}})
    c = await clients(p.port)
    sid = c.request("/", user="u", extra=[("x-big", "v" * 20000)])
    r = await c.reply(sid)
    # past SETTINGS_MAX_HEADER_LIST_SIZE h2 closes the connection (an HPACK bomb defence)
    assert c.goaway is not None or r.status == 431
    assert not a.requests


# ---------------------------------------------------------------------------------------
# conformance cases h2 leaves to the server (RFC 9113)


async def test_new_stream_beyond_the_limit_closes_the_connection(backends, proxy, clients):
    """h2 enforces SETTINGS_MAX_CONCURRENT_STREAMS as a connection error (PROTOCOL_ERROR);
    RFC 9113 §5.1.2 asks for a stream error (REFUSED_STREAM): a documented deviation."""
    (a,) = await backends("a")
    a.handler = _slow
    p = await proxy([a], H2C)
    # a client that ignores SETTINGS_MAX_CONCURRENT_STREAMS
    c = await clients(p.port)
    c.conn.remote_settings = h2.settings.Settings(client=False)  # the defaults: no limit
    sids = [c.request("/", user=f"u{i}") for i in range(h2client.MAX_CONCURRENT_STREAMS + 1)]
    await c.reply(sids[-1])
    assert c.goaway is not None and c.goaway.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_data_on_an_answered_stream_is_credited(backends, proxy, clients):
    """The proxy answers before the request body ended (a refusal): the rest of that body
    still counts against the connection window and must be given back (RFC 9113 §6.9)."""
    (a,) = await backends("a")
    p = await proxy([a], {**H2C, "routing": {"no_key": "reject"}})
    c = await clients(p.port)
    sid = c.request("/", method="POST", end=False)
    r = await c.reply(sid)
    assert r.status == 400
    before = c.conn.outbound_flow_control_window
    body = b"x" * 60000
    try:
        for i in range(0, len(body), 15000):
            c.send_body(sid, body[i : i + 15000], end=i + 15000 >= len(body))
    except h2.exceptions.StreamClosedError:
        pass  # it was reset (NO_ERROR) already
    ok = await c.reply(c.request("/", user="u"))
    assert ok.status == 400 or ok.status == 200
    await eventually(
        lambda: c.conn.outbound_flow_control_window >= before, what="connection window given back"
    )


# ---------------------------------------------------------------------------------------
# graceful shutdown


@pytest.mark.slow
async def test_shutdown_sends_goaway_and_lets_streams_finish(backends, proxy, clients):
    (a,) = await backends("a")

    async def handler(request, rec):
        await asyncio.sleep(0.5)
        return web.Response(text="finished")

    a.handler = handler
    p = await proxy([a], H2C)
    c = await clients(p.port)
    sids = [c.request("/", user=f"u{i}") for i in range(3)]
    await eventually(lambda: len(a.requests) == 3, what="streams at the backend")
    stopping = asyncio.get_running_loop().create_task(p.svc.stop())
    await eventually(lambda: c.goaway is not None, what="GOAWAY")
    assert c.goaway.error_code == ErrorCodes.NO_ERROR
    assert c.goaway.last_stream_id == sids[-1]
    late = c.request("/", user="late")  # opened after the GOAWAY: refused, retryable
    assert (await c.reply(late)).reset == ErrorCodes.REFUSED_STREAM
    for sid in sids:
        r = await c.reply(sid)
        assert r.reset is None and c.goaway.error_code == 0, (r, c.goaway)
        assert r.status == 200 and r.body == b"finished"
    await asyncio.wait_for(c.closed.wait(), IO_TIMEOUT)
    await asyncio.wait_for(stopping, 10)
    assert len(a.requests) == 3


async def test_streams_finish_after_the_clients_goaway(backends, proxy, clients):
    """A client closing gracefully (GOAWAY, RFC 9113 §6.8) still gets the answers it is
    waiting for; then the proxy closes the connection."""
    (a,) = await backends("a")

    async def handler(request, rec):
        await asyncio.sleep(0.3)
        return web.Response(text="answered")

    a.handler = handler
    p = await proxy([a], H2C)
    c = await clients(p.port)
    sids = [c.request("/", user=f"u{i}") for i in range(3)]
    await eventually(lambda: len(a.requests) == 3, what="streams at the backend")
    c.conn.close_connection(last_stream_id=0)
    c.flush()
    for sid in sids:
        r = await c.reply(sid)
        assert r.reset is None and r.status == 200 and r.body == b"answered"
    await asyncio.wait_for(c.closed.wait(), IO_TIMEOUT)


# ---------------------------------------------------------------------------------------
# over TLS, chosen by ALPN


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_overrides(ca: trustme.CA, tmp_path, alpn: list[str]) -> dict:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "leaf.crt", tmp_path / "leaf.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return {"listen.tls": {"cert": str(cert), "key": str(key), "alpn": alpn}}


def client_ctx(ca: trustme.CA, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(alpn)
    return ctx


async def test_h2_over_tls_by_alpn(backends, proxy, clients, ca, tmp_path):
    bs = await backends("a", "b")
    p = await proxy(bs, tls_overrides(ca, tmp_path, ["h2", "http/1.1"]))
    c = await clients(p.port, ctx=client_ctx(ca, ["h2", "http/1.1"]))
    for u in USERS[:10]:
        r = await c.reply(c.request("/t", user=u))
        assert r.status == 200 and r.field(b"x-backend").decode() == p.pref(u)[0]
    assert all(rec.one("X-Forwarded-Proto") == "https" for b in bs for rec in b.requests)
    # the same listener still speaks HTTP/1.1 to a client that asks for it
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", p.port, ssl=client_ctx(ca, ["http/1.1"]), server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.write(http_request("GET", "/", headers={"X-User-Id": "u1", "Connection": "close"}))
    data = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")


async def test_h2_not_offered_unless_configured(backends, proxy, ca, tmp_path):
    (a,) = await backends("a")
    p = await proxy([a], tls_overrides(ca, tmp_path, ["http/1.1"]))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", p.port, ssl=client_ctx(ca, ["h2"]), server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
    writer.close()


# ---------------------------------------------------------------------------------------
# curl, as users run it


def _curl_http2() -> bool:
    exe = shutil.which("curl")
    if exe is None:
        return False
    out = subprocess.run([exe, "-V"], capture_output=True, text=True, check=False)
    return "HTTP2" in out.stdout


needs_curl = pytest.mark.skipif(not _curl_http2(), reason="curl without HTTP/2")


async def _curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "5",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    return proc.returncode or 0, out.decode(), err.decode()


@needs_curl
async def test_curl_prior_knowledge(backends, proxy):
    bs = await backends("a", "b")
    p = await proxy(bs, H2C)
    rc, out, err = await _curl(
        "--http2-prior-knowledge",
        "-H",
        "X-User-Id: u7",
        "-w",
        "\n%{http_version}",
        f"http://127.0.0.1:{p.port}/c",
    )
    assert rc == 0, err
    body, version = out.rsplit("\n", 1)
    assert version == "2"
    assert body == f"{p.pref('u7')[0]} GET /c\n"


@needs_curl
async def test_curl_http2_over_tls(backends, proxy, ca, tmp_path):
    (a,) = await backends("a")
    p = await proxy([a], tls_overrides(ca, tmp_path, ["h2", "http/1.1"]))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    rc, out, err = await _curl(
        "--http2",
        "--cacert",
        str(tmp_path / "ca.pem"),
        "-H",
        "X-User-Id: u7",
        "--data-binary",
        "posted",
        "-w",
        "\n%{http_version}",
        f"https://localhost:{p.port}/c",
    )
    assert rc == 0, err
    body, version = out.rsplit("\n", 1)
    assert (body, version) == ("posted", "2")
