"""Judges for the security suite (issue 8; docs/THREAT_MODEL.md): what a backend received,
re-parsed strictly, and the three outcomes a hostile request may have.

- ``parse_forwarded``: re-parses what a backend received with a strict llhttp parser
  (httptools), so a test can say "exactly one request, framed one way, with this body";
- ``assert_normalised``: the forwarded form of one request is unambiguous (one framing
  field at most, never both, no hop-by-hop field, one Host, one of each X-Sticky-* field);
- ``Rig``: a proxy in front of a raw backend whose upstream connection is already pooled
  (the path on which a request is written to a backend synchronously, the strictest one),
  with ``expect_rejected`` / ``expect_forwarded`` / ``expect_rejected_midbody``;
- ``strict_responder`` / ``early_responder``: raw-backend scripts that answer every request,
  or answer as soon as a request head arrives, before reading any body (what makes a
  body-length disagreement exploitable);
- ``metric``: one sample of the proxy's /metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httptools

from support.backends import RawBackend, RawConn
from support.http import Client, IncompleteResponse, Response
from support.metrics import Metrics
from support.net import IO_TIMEOUT
from support.proxy import ProxyHandle
from support.wire import Message, StrictCollector

# After a refusal, how long a test waits to be sure nothing more reaches a backend. The proxy
# writes to an upstream connection synchronously (a pooled one) or after a connect on
# loopback (well under this), so a forwarded byte would arrive long before.
SETTLE = 0.1

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ---------------------------------------------------------------------------------------
# what a backend received, re-parsed


@dataclass
class Forwarded:
    method: str = ""
    target: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def values(self, name: str) -> list[bytes]:
        ln = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == ln]

    def names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]

    @classmethod
    def of(cls, m: Message) -> Forwarded:
        return cls(m.method.decode(), m.target, m.version.decode(), m.fields, m.body, m.trailers)


def parse_forwarded(raw: bytes) -> tuple[list[Forwarded], bool]:
    """The complete requests in ``raw`` and whether an incomplete one follows them.

    Fails the test if ``raw`` is not a valid stream of HTTP/1.1 requests for strict llhttp,
    or if it asks for a protocol switch (the proxy forwards ``Upgrade`` only for WebSocket).
    """
    col = StrictCollector(httptools.HttpRequestParser)
    try:
        col.parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        raise AssertionError(
            f"the forwarded bytes ask for a protocol switch: {raw[:400]!r}"
        ) from None
    except httptools.HttpParserError as e:
        raise AssertionError(
            f"a backend received bytes that are not valid HTTP/1.1 ({e}): {raw[:400]!r}"
        ) from None
    return [Forwarded.of(m) for m in col.done], col.cur is not None


# Fields that are never forwarded (RFC 9110 §7.6.1 and the de-facto ones); Transfer-Encoding
# is checked separately: the proxy re-frames and may send exactly "chunked".
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"http2-settings",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
PROXY_SET = ("x-sticky-key", "x-sticky-backend", "x-sticky-route", "x-sticky-ring")


def assert_normalised(req: Forwarded, body: bytes, *, keyed: bool = True) -> None:
    """One forwarded request is unambiguous: at most one framing field and never both,
    framing that matches the body, no hop-by-hop field, one Host, one of each X-Sticky-*."""
    names = req.names()
    cls, tes = req.values("content-length"), req.values("transfer-encoding")
    assert not (cls and tes), f"both Content-Length and Transfer-Encoding: {req.headers!r}"
    assert len(cls) <= 1 and len(tes) <= 1, f"repeated framing field: {req.headers!r}"
    if tes:
        assert tes == [b"chunked"], f"Transfer-Encoding other than chunked: {tes!r}"
    if cls:
        assert cls[0].isdigit() and int(cls[0]) == len(req.body), (cls, len(req.body))
    if body:
        assert cls or tes, f"a body without framing: {req.headers!r}"
    assert req.body == body, f"body {req.body[:200]!r} != intended {body[:200]!r}"
    hop = sorted(set(names) & HOP_BY_HOP)
    assert not hop, f"hop-by-hop fields forwarded: {hop} in {req.headers!r}"
    assert names.count(b"host") == 1, f"Host fields: {req.values('host')!r}"
    assert req.version == "1.1", req.version
    for name in PROXY_SET:
        # the key and the primary/failover route exist only for a keyed request
        want = 1 if keyed or name in ("x-sticky-backend", "x-sticky-ring") else 0
        assert names.count(name.encode()) == want, f"{name}: {req.values(name)!r}"
    trailer_names = {n.lower() for n, _ in req.trailers}
    assert not trailer_names & (
        HOP_BY_HOP
        | {b"content-length", b"transfer-encoding", b"host"}
        | {n.encode() for n in PROXY_SET}
    ), req.trailers


# ---------------------------------------------------------------------------------------
# backends


async def _fed(conn: RawConn, col: StrictCollector) -> AsyncIterator[None]:
    """Feeds each read of ``conn`` (recorded in ``conn.raw``) to ``col``'s parser and yields
    after it, until the connection ends (a reset counts as its end); the parser's
    ``HttpParserError`` propagates."""
    while True:
        try:
            data = await conn.read_some()
        except ConnectionError:
            conn.eof = True
            return
        if not data:
            return
        col.parser.feed_data(data)
        yield


def strict_responder(reply: bytes = OK):
    """Answers ``reply`` to every complete request, parsing with strict llhttp; on bytes it
    cannot parse it records the error (``backend.errors``) and closes the connection."""

    async def script(conn: RawConn) -> None:
        col = StrictCollector(httptools.HttpRequestParser)
        try:
            async for _ in _fed(conn, col):
                while col.done:
                    col.done.pop(0)
                    conn.send(reply)
        except httptools.HttpParserError as e:
            conn.backend.__dict__.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
            conn.abort()
            conn.eof = True

    return script


def early_responder(conn: RawConn) -> Any:
    """A backend that answers each request as soon as its head has arrived, before reading
    its body (many applications do for a 401, 404 or redirect). Responses name the target;
    every request head it saw is kept in ``backend.heads`` as (target, body it then read)."""

    class _Early(StrictCollector):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            assert self.cur is not None
            body = b"resp-for " + self.cur.target
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            heads.append(self.cur)

    heads = conn.backend.__dict__.setdefault("heads", [])

    async def run() -> None:
        col = _Early(httptools.HttpRequestParser)
        try:
            async for _ in _fed(conn, col):
                pass
        except httptools.HttpParserError as e:
            conn.backend.__dict__.setdefault("errors", []).append(str(e))
            conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()

    return run()


# ---------------------------------------------------------------------------------------
# the rig: a proxy with one pooled upstream connection to a raw backend


@dataclass
class Rig:
    p: ProxyHandle
    be: RawBackend
    offsets: dict[int, int] = field(default_factory=dict)

    async def warm(self) -> None:
        """One request on its own client connection, so the next one reuses a pooled
        upstream connection (written synchronously, while the request is being parsed)."""
        r = await self.p.get("/warm", user="u")
        assert r.status == 200, r
        self.mark()

    def mark(self) -> None:
        self.offsets = {id(c): len(c.raw) for c in self.be.connections}

    def new_bytes(self) -> list[tuple[RawConn, bytes]]:
        """Per backend connection, the bytes received since ``mark``."""
        return [(c, bytes(c.raw[self.offsets.get(id(c), 0) :])) for c in self.be.connections]

    def all_new(self) -> bytes:
        return b"".join(b for _, b in self.new_bytes())

    def new_requests(self) -> tuple[list[Forwarded], bool]:
        reqs: list[Forwarded] = []
        partial = False
        for _, data in self.new_bytes():
            got, incomplete = parse_forwarded(data)
            reqs += got
            partial = partial or incomplete
        return reqs, partial


async def expect_rejected(
    rig: Rig,
    raw: bytes,
    *,
    statuses: frozenset[int] | range = range(400, 500),
    timeout: float = 3.0,
) -> Response:
    """Outcome (a): the proxy answers a 4xx with a reason itself, closes the connection, and
    no byte of this connection's input reaches a backend."""
    c = await rig.p.client()
    try:
        c.send(raw)
        r = await c.response(timeout=timeout)
        assert r.status in statuses, (r.status, r.body)
        assert r.body.startswith(f"{r.status} ".encode()) and b": " in r.body, r.body
        assert r.wants_close, r.headers
        assert await c.closed(timeout=timeout)
    finally:
        c.close()
    await asyncio.sleep(SETTLE)
    got = rig.all_new()
    assert got == b"", f"refused with {r.status}, yet a backend received {got[:500]!r}"
    return r


async def expect_forwarded(
    rig: Rig, raw: bytes, bodies: list[bytes], *, timeout: float = 3.0
) -> list[Forwarded]:
    """Outcome (b): one normalised request reaches the backend per client request, each
    with the body the client meant, and the client gets each backend answer."""
    c = await rig.p.client()
    try:
        c.send(raw)
        for i in range(len(bodies)):
            r = await c.response(timeout=timeout)
            assert r.status == 200 and r.body == b"ok", (i, r.status, r.body)
    finally:
        c.close()
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        reqs, partial = rig.new_requests()
        if len(reqs) >= len(bodies) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(SETTLE)
    reqs, partial = rig.new_requests()
    assert len(reqs) == len(bodies) and not partial, (
        f"{len(reqs)} requests (+partial={partial}) reached the backend for {len(bodies)} "
        f"sent: {rig.all_new()[:600]!r}"
    )
    assert sorted(r.body for r in reqs) == sorted(bodies)
    for req in reqs:
        assert_normalised(req, req.body)
    assert not getattr(rig.be, "errors", []), rig.be.errors
    return reqs


async def expect_rejected_midbody(rig: Rig, raw: bytes, *, timeout: float = 3.0) -> None:
    """Outcome (a'), for a body that turns out malformed after the head was accepted: the
    proxy streams request bodies, so a backend may have received a prefix of a well-framed
    request, but never a complete one; the client gets a 4xx (or its connection cut) and the
    upstream connection that carried the prefix is closed, never reused."""
    c = await rig.p.client()
    try:
        c.send(raw)
        try:
            r = await c.response(timeout=timeout)
        except IncompleteResponse:
            pass
        else:
            assert 400 <= r.status < 500, (r.status, r.body)
            assert r.wants_close
        assert await c.closed(timeout=timeout)
    finally:
        c.close()
    deadline = time.monotonic() + IO_TIMEOUT
    while not all(conn.eof for conn, data in rig.new_bytes() if data):
        assert time.monotonic() < deadline, (
            "an upstream connection carrying a broken body stayed open"
        )
        await asyncio.sleep(0.01)
    reqs, _ = rig.new_requests()
    assert reqs == [], f"a complete request reached the backend: {rig.all_new()[:500]!r}"


async def metric(admin_port: int, name: str, **labels: str) -> float:
    """One sample of the proxy's /metrics, with exactly these labels (0 when absent)."""
    c = await Client.connect(admin_port)
    try:
        c.send(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        r = await c.response()
    finally:
        c.close()
    value = Metrics(r.body.decode()).value(name, **labels)
    assert value is not None
    return value
