"""Bounded-time property tests: arbitrary input never escapes as an unexpected exception.

The request path is fuzzed in memory (no sockets): random bytes and mutated valid requests
go into a real ClientProtocol; whatever happens, the proxy either forwards one well-formed
request head per parsed request or answers 4xx/5xx, and never raises.
"""

import asyncio
import re

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory import Sink, pooled_upstreams

from stickyproxy.config import ConfigError, KeySource, parse
from stickyproxy.control.process import build_process
from stickyproxy.dataplane.client import OPEN, ClientProtocol
from stickyproxy.dataplane.http import RequestError, normalise_target
from stickyproxy.routing.keys import KeyExtractor, KeyRejected

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SOURCES = [
    KeySource("header", "X-User-Id"),
    KeySource("cookie", "uid"),
    KeySource("query", "user"),
    KeySource("path", pattern=re.compile(r"^/users/(?P<key>[^/]+)")),
]


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from([b"x-user-id", b"cookie", b"other"]), st.binary(max_size=80)),
        max_size=6,
    ),
    st.binary(max_size=80),
    st.binary(max_size=80),
)
def test_key_extraction_never_fails_unexpectedly(headers, path, query):
    try:
        got = KeyExtractor(SOURCES, 64).extract(headers, b"/" + path, query)
    except KeyRejected:
        return
    if got is not None:
        assert 0 < len(got.key.encode()) <= 64
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in got.key)


@FUZZ
@given(st.binary(max_size=100), st.one_of(st.none(), st.binary(max_size=30)))
def test_target_normalisation_never_fails_unexpectedly(target, host):
    try:
        out = normalise_target("GET", target, host)
    except RequestError as e:
        assert 400 <= e.status < 500
        return
    assert out.startswith(b"/")


scalars = st.one_of(
    st.integers(-5, 70000),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
tables = st.dictionaries(
    st.sampled_from(
        [
            "host",
            "port",
            "id",
            "url",
            "weight",
            "keys",
            "from",
            "name",
            "connect",
            "interval",
            "rise",
            "max_body",
            "no_key",
            "token",
            "bogus",
        ]
    ),
    st.one_of(scalars, st.lists(scalars, max_size=3)),
    max_size=5,
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["listen", "admin", "routing", "backends", "health", "timeouts", "limits", "junk"]
        ),
        st.one_of(tables, st.lists(tables, max_size=3), scalars),
        max_size=5,
    )
)
def test_config_parse_only_raises_config_errors(raw):
    try:
        parse(raw)
    except ConfigError as e:
        assert e.errors and all(isinstance(x, str) and ":" in x for x in e.errors)


# -- the request path, in memory -----------------------------------------------------------

CONFIG = {
    "listen": {"port": 0},
    "admin": {"enabled": False},
    "health": {"enabled": False},
    "limits": {"max_header_bytes": 4096, "max_request_line": 1024, "max_body": 1000},
    "backends": [
        {"id": "a", "url": "http://127.0.0.1:1"},
        {"id": "b", "url": "http://127.0.0.1:2"},
    ],
}


# A request line with an extension method (forwarded as sent; llhttp does not know it),
# which the checker shows llhttp with a method it knows, as the proxy itself does.
_EXTENSION_LINE = re.compile(rb"(?<![A-Z0-9_.\-])([A-Z0-9_.\-]+)( [\x21-\x7e]+ HTTP/1\.1\r\n)")
_LLHTTP_METHODS = {b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE"}


def _heads(data: bytes) -> list[bytes]:
    """Request heads the backend received, checked to parse cleanly with llhttp."""
    heads = []

    class P:
        def on_message_complete(self):
            heads.append(True)

    def known(m: re.Match) -> bytes:
        return (m[1] if m[1] in _LLHTTP_METHODS else b"GET") + m[2]

    p = httptools.HttpRequestParser(P())
    # raises if the proxy ever forwarded something malformed
    p.feed_data(_EXTENSION_LINE.sub(known, bytes(data)))
    return heads


VALID = (
    b"GET /a?user=u1 HTTP/1.1\r\nHost: x\r\nX-User-Id: %s\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
)


@st.composite
def request_bytes(draw):
    base = draw(st.sampled_from(VALID))
    if b"%s" in base:
        base = base.replace(
            b"%s", draw(st.binary(min_size=1, max_size=10)).replace(b"\r", b"").replace(b"\n", b"")
        )
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[i : i + draw(st.integers(1, 4))]
        elif op == "dup":
            data += base
    return bytes(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request_bytes(), min_size=1, max_size=3), st.integers(1, 64))
def test_request_path_never_raises_and_forwards_only_clean_heads(requests, split):
    async def scenario():
        from stickyproxy.config import parse as parse_config

        proxy = build_process(parse_config(CONFIG), "single").proxy
        upstream = {bid: t for bid, (_, t) in pooled_upstreams(proxy).items()}
        client = ClientProtocol(proxy)
        out = Sink()
        client.connection_made(out)
        data = b"".join(requests)
        for i in range(0, len(data), split):
            client.data_received(data[i : i + split])
            if client.conn_state != OPEN:
                break
        for t in upstream.values():
            _heads(t.data)
        if out.data:
            assert out.data.startswith(b"HTTP/1.1 ")
            status = int(out.data[9:12])
            assert 400 <= status < 600
        client.connection_lost(None)

    asyncio.run(scenario())
