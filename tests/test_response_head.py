"""Relaying a plain response head from its raw bytes (dataplane/http.py).

The raw path must be invisible: for any response it accepts, the client receives exactly
the bytes the general, field-by-field path would send. The property test checks that by
sending each generated response twice, once in one read (raw path) and once with its head
split across two reads (general path).
"""

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stickyproxy.config import parse
from stickyproxy.dataplane import Proxy
from stickyproxy.dataplane.client import ClientProtocol
from stickyproxy.dataplane.http import plain_response_head, split_response_head

from memory import Sink, pooled_upstreams

OK = b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"


@pytest.mark.parametrize("data, head_only, plain", [
    (OK, False, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False, True),
    # no Content-Length: only a response without a body is plain
    (b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\nok", False, False),
    (b"HTTP/1.1 204 No Content\r\nServer: s\r\n\r\n", False, True),
    (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", False, True),
    (b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\n", True, True),
    (b"HTTP/1.1 2040 X\r\nServer: s\r\n\r\n", False, False),
    # framing the general path handles: chunked (trailers), repeated Content-Length
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False, False),
    (b"HTTP/1.1 200 OK\r\ntransfer-ENCODING: chunked\r\nContent-Length: 2\r\n\r\n", False, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", False, False),
    # not final: 1xx heads are followed by another head
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, False),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", False, False),
    # the head does not end in this read
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", False, False),
    (b"HTTP/1.1 200 OK\r\nContent-Len", False, False),
    # line endings other than CRLF, obs-fold: left to llhttp's general path
    (b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok", False, False),
    (b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 2\r\n\r\nok", False, False),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok", False, False),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n\tb\r\nContent-Length: 2\r\n\r\nok", False, False),
    (b"", False, False),
])
def test_which_heads_are_plain(data, head_only, plain):
    n = plain_response_head(data, head_only)
    if plain:
        assert n == data.index(b"\r\n\r\n") + 2
    else:
        assert n == 0


@pytest.mark.parametrize("head, reason, pieces, cl, conn", [
    (OK[:OK.index(b"\r\n\r\n") + 2], b"OK", [b"Server: s\r\n"], b"2", [b"keep-alive"]),
    (b"HTTP/1.1 200 \r\nA: 1\r\n", b"", [b"A: 1\r\n"], None, None),
    (b"HTTP/1.1 200\r\nA: 1\r\n", b"", [b"A: 1\r\n"], None, None),
    (b"HTTP/1.1 404 Not Found Here\r\n", b"Not Found Here", [], None, None),
    # every hop-by-hop field goes, whatever its case; a longer name that starts alike stays
    (b"HTTP/1.1 200 OK\r\nCONNECTION: close\r\nA: 1\r\nKeep-Alive: timeout=5\r\n"
     b"Proxy-Authenticate: Basic\r\nConnection-Extra: x\r\nUpgrade: h2c\r\nTrailer: T\r\n"
     b"te: x\r\nProxy-Connection: y\r\nHTTP2-Settings: z\r\nContent-length:  7 \r\nB: 2\r\n",
     b"OK", [b"A: 1\r\n", b"Connection-Extra: x\r\n", b"B: 2\r\n"], b"7", [b"close"]),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: X-A\r\nX-A: 1\r\n",
     b"OK", [b"X-A: 1\r\n"], None, [b"keep-alive", b"X-A"]),
])
def test_splitting_a_plain_head(head, reason, pieces, cl, conn):
    assert split_response_head(head) == (reason, pieces, cl, conn)


# -- the raw path and the general path send the same bytes --------------------------------

CONFIG = {"listen": {"port": 0}, "admin": {"enabled": False}, "health": {"enabled": False},
          "backends": [{"id": "a", "url": "http://127.0.0.1:1"}]}

NAMES = [b"Server", b"Content-Type", b"X-A", b"x-b", b"Connection", b"connection",
         b"Keep-Alive", b"Proxy-Authenticate", b"Trailer", b"Upgrade", b"Set-Cookie",
         b"Connection-Extra", b"Cache-Control"]
VALUES = [b"v", b"keep-alive", b"close", b"x-a", b"X-B, keep-alive", b"a b  c", b""]


def relay(method: bytes, response: bytes, split_at: int | None) -> tuple[bytes, bool]:
    """What the client receives for ``response``, and whether the raw path relayed it.
    ``split_at`` delivers the response in two reads, cut there."""
    async def scenario():
        proxy = Proxy(parse(CONFIG))
        up, _ = pooled_upstreams(proxy)["a"]
        client = ClientProtocol(proxy)
        out = Sink()
        client.connection_made(out)
        client.data_received(method + b" / HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\n\r\n")
        assert up.exchange is not None
        if split_at is None:
            up.data_received(response)
        else:
            up.data_received(response[:split_at])
            up.data_received(response[split_at:])
        raw = up.plain_parser is not None
        client.connection_lost(None)
        return bytes(out.data), raw
    return asyncio.run(scenario())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([b"200 OK", b"204 No Content", b"304 Not Modified", b"404 Nope",
                        b"500 ", b"201"]),
       st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=8),
       st.sampled_from([b"GET", b"HEAD"]), st.booleans())
def test_raw_and_general_paths_send_the_same_bytes(status, fields, method, http10):
    body = b"" if status[:3] in (b"204", b"304") else b"hello"
    head = (b"HTTP/1.0 " if http10 else b"HTTP/1.1 ") + status + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    response = head + b"\r\n" + (b"" if method == b"HEAD" else body)
    raw_out, raw = relay(method, response, None)
    general_out, general_raw = relay(method, response, len(head) // 2)
    assert raw and not general_raw
    assert raw_out == general_out
    assert raw_out.startswith(b"HTTP/1.1 " + status[:3])


def test_a_connection_switches_paths_between_responses():
    async def scenario():
        proxy = Proxy(parse(CONFIG))
        up, _ = pooled_upstreams(proxy)["a"]
        client = ClientProtocol(proxy)
        out = Sink()
        client.connection_made(out)
        responses = [
            OK,                                                                    # raw
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",  # general
            OK,                                                                    # raw
        ]
        for response in responses:
            client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\n\r\n")
            assert up.exchange is not None, out.data
            up.data_received(response)
        client.connection_lost(None)
        return bytes(out.data)
    data = asyncio.run(scenario())
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.count(b"Content-Length: 2\r\n") == 2 and data.count(b"0\r\n\r\n") == 1
    assert b"Connection: keep-alive" not in data and b"Transfer-Encoding: chunked" in data
