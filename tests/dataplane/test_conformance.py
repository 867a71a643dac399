"""Request lines, targets and responses that RFC 9110/9112 allow but llhttp alone would not
carry, and responses no client could read as sent (docs/design.md, "Methods, versions,
targets and Host"). Each is checked against what the backend received or what the client
got, byte for byte where it matters."""

from __future__ import annotations

import asyncio
import time

import pytest

from support.backends import RawConn, respond_with

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
H = b"Host: shop.example\r\nX-User-Id: u\r\n"


async def head_reader(conn: RawConn) -> None:
    """A backend that frames by bytes alone (body-less requests, or one Content-Length
    body), so it accepts methods its own parser would not know, and answers each."""
    lines = conn.backend.__dict__.setdefault("lines", [])
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = await conn.read_some()
            if not data:
                return
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines.append(head.split(b"\r\n", 1)[0])
        if b"transfer-encoding: chunked" in head.lower():
            # the proxy's own chunking: size lines, data, a last chunk, trailers, empty line
            while True:
                while b"\r\n" not in buf:
                    buf += await conn.read_some()
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while not (buf.startswith(b"\r\n") or b"\r\n\r\n" in buf):
                        buf += await conn.read_some()
                    buf = buf[2:] if buf.startswith(b"\r\n") else buf.partition(b"\r\n\r\n")[2]
                    break
                while len(buf) < size + 2:
                    buf += await conn.read_some()
                buf = buf[size + 2 :]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
                while len(buf) < n:
                    data = await conn.read_some()
                    if not data:
                        return
                    buf += data
                buf = buf[n:]
        conn.send(OK)
        await conn.drain()


def request_lines(be) -> list[bytes]:
    """The request lines a ``head_reader`` backend received, in arrival order."""
    return be.__dict__.get("lines", [])


@pytest.fixture
async def lenient(raw_backend, proxy):
    be = await raw_backend("a", head_reader)
    p = await proxy([be])
    return p, be


@pytest.mark.parametrize(
    "sent, forwarded",
    [
        # RFC 9110 §9.1, §16.1: methods are extensible; a proxy forwards what it does not know
        (b"BREW /pot HTTP/1.1", b"BREW /pot HTTP/1.1"),
        (b"FOOBAR / HTTP/1.1", b"FOOBAR / HTTP/1.1"),
        (b"X-CUSTOM.V2_ /a?b=c HTTP/1.1", b"X-CUSTOM.V2_ /a?b=c HTTP/1.1"),
        # RFC 9110 §2.5: a later minor version is processed as the highest one known (1.1)
        (b"GET /v HTTP/1.2", b"GET /v HTTP/1.1"),
        (b"BREW /v HTTP/1.9", b"BREW /v HTTP/1.1"),
        # RFC 3986 §3.2.3: an empty port is the scheme's default
        (b"GET http://shop.example:/x HTTP/1.1", b"GET /x HTTP/1.1"),
    ],
)
async def test_valid_request_line_is_forwarded(lenient, sent, forwarded):
    p, be = lenient
    r = await p.exchange(sent + b"\r\n" + H + b"\r\n")
    assert r.status == 200, r.body
    assert request_lines(be) == [forwarded]


async def test_extension_method_with_a_body_is_forwarded_with_it(lenient):
    p, be = lenient
    r = await p.exchange(b"BREW /pot HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello")
    assert r.status == 200
    assert be.raw.startswith(b"BREW /pot HTTP/1.1\r\n")
    assert be.raw.endswith(b"Content-Length: 5\r\n\r\nhello")


async def test_extension_methods_pipelined_and_split_across_reads(lenient):
    """The start of a request llhttp refused is found exactly: behind body-less requests in
    the same read, and when its request line arrives in pieces."""
    p, be = lenient
    c = await p.client()
    c.send(
        b"GET /1 HTTP/1.1\r\n" + H + b"\r\n\r\nBREW /2 HTTP/1.1\r\n" + H + b"\r\n"
        b"GET /3 HTTP/1.1\r\n" + H + b"\r\nPURR /4 HTTP/1.2\r\n" + H + b"\r\n"
    )
    for _ in range(4):
        assert (await c.response()).status == 200
    await c.send_drain(b"SCR")
    await asyncio.sleep(0.05)
    await c.send_drain(b"ATCH /5 HT")
    await asyncio.sleep(0.05)
    c.send(b"TP/1.1\r\n" + H + b"\r\n")
    assert (await c.response()).status == 200
    c.close()
    assert request_lines(be) == [
        b"GET /1 HTTP/1.1",
        b"BREW /2 HTTP/1.1",
        b"GET /3 HTTP/1.1",
        b"PURR /4 HTTP/1.1",
        b"SCRATCH /5 HTTP/1.1",
    ]


@pytest.mark.parametrize(
    "first",
    [
        b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n\r\n\r\n\r\n",
        b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
        b"POST /1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"4;x=1\r\n\r\n\r\n\r\n0\r\nX-T: 1\r\n\r\n",
    ],
    ids=["content-length", "content-length-0", "chunked"],
)
async def test_extension_method_behind_a_body_in_the_same_read_is_found_past_it(lenient, first):
    """The next request's start is found by stepping over the body by its own framing
    (here a body that looks like an empty line), never by searching it."""
    p, be = lenient
    c = await p.client()
    c.send(first + b"BREW /2 HTTP/1.1\r\n" + H + b"\r\n")
    assert (await c.response()).status == 200
    assert (await c.response()).status == 200
    c.close()
    assert request_lines(be) == [b"POST /1 HTTP/1.1", b"BREW /2 HTTP/1.1"]


@pytest.mark.parametrize(
    "line",
    [
        b"BREW  / HTTP/1.1",  # two spaces
        b"BR(EW / HTTP/1.1",  # not a token
        b"brew / HTTP/1.1",  # a case variant: refused, like "get"
        b"BREW! / HTTP/1.1",  # a token, but not a method name the proxy forwards
        b"BREW / HTTP/2.1",  # another major version
        b"BREW /a b HTTP/1.1",  # space in the target
        b"BREW / http/1.1",
    ],
)
async def test_invalid_request_line_with_an_unknown_method_is_refused(lenient, line):
    p, be = lenient
    c = await p.client()
    c.send(line + b"\r\n" + H + b"\r\n")
    r = await c.response()
    assert r.status == 400
    assert await c.closed()
    assert be.raw == b""


async def test_http09_request_is_answered_at_once(raw_backend, proxy):
    """`GET /` with no version: refused as soon as its line ends, not at the header deadline."""
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"timeouts": {"client_header": "5s"}})
    for raw in (b"GET /\r\n", b"GET /\n"):
        c = await p.client()
        t0 = time.monotonic()
        c.send(raw)
        r = await c.response(timeout=3)
        assert r.status == 400 and b"no HTTP version" in r.body
        assert time.monotonic() - t0 < 2
        assert await c.closed()
    assert be.raw == b""


async def test_partial_request_line_is_not_taken_for_http09(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be])
    c = await p.client()
    await c.send_drain(b"GET / HT")
    await asyncio.sleep(0.1)
    c.send(b"TP/1.1\r\n" + H + b"\r\n")
    assert (await c.response()).status == 200


# ---------------------------------------------------------------------------------------
# responses


@pytest.mark.parametrize(
    "te, status, relayed_te",
    [
        (b"chunked", 200, b"chunked"),
        (b"gzip, chunked", 200, b"gzip, chunked"),
        (b"gzip, br, chunked", 200, b"gzip, br, chunked"),
        # RFC 9112 §6.1: chunked once, and last; otherwise no two readers agree on the length
        (b"chunked, gzip, chunked", 502, None),
        (b"chunked, gzip", 502, None),
        (b"chunked, chunked", 502, None),
    ],
)
async def test_response_transfer_codings_are_relayed_in_order_or_refused(
    raw_backend, proxy, te, status, relayed_te
):
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    be = await raw_backend("a", respond_with(resp))
    p = await proxy([be])
    r = await p.exchange(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n")
    assert r.status == status, r.body
    if relayed_te is not None:
        assert r.get("Transfer-Encoding") == relayed_te.decode()
        assert r.body == b"hello"


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 099 Odd", b"HTTP/1.1 000 Zero", b"HTTP/1.1 600 Beyond", b"HTTP/1.1 999 Beyond"],
)
async def test_response_status_outside_100_to_599_is_a_bad_gateway(raw_backend, proxy, status_line):
    """RFC 9110 §15: valid status codes are 100..599; "099" would be relayed as "99"."""
    be = await raw_backend("a", respond_with(status_line + b"\r\nContent-Length: 2\r\n\r\nok"))
    p = await proxy([be])
    r = await p.exchange(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n")
    assert r.status == 502 and b"invalid status code" in r.body


async def test_response_with_a_later_minor_version_is_relayed_as_http11(raw_backend, proxy):
    """RFC 9110 §2.5: `HTTP/1.2 200 OK` from a backend is processed as HTTP/1.1."""
    be = await raw_backend("a", respond_with(b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    p = await proxy([be])
    for _ in range(2):  # and the connection is reused
        r = await p.exchange(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        assert (r.status, r.body) == (200, b"ok")
