"""listen.proxy_protocol through the real proxy: the header of a trusted load balancer names
the client (X-Forwarded-For, no_key = "client-ip"); a trusted peer without a valid header
and an untrusted peer sending one are refused."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from stickyproxy.dataplane.proxy_protocol import V2_SIGNATURE
from support.net import IO_TIMEOUT

TRUST = {"listen": {"trusted_proxies": ["127.0.0.1/32"], "proxy_protocol": True}}
REQUEST = b"GET /x HTTP/1.1\r\nHost: shop\r\nX-User-Id: u1\r\nConnection: close\r\n\r\n"


def v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


async def exchange(port: int, data: bytes, *, local: str = "127.0.0.1") -> bytes:
    sock = socket.socket()
    sock.bind((local, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n",
        v2("203.0.113.7", "10.0.0.1", 51000, 80),
    ],
)
async def test_a_trusted_balancers_header_names_the_client(backends, proxy, header):
    (b,) = await backends("app")
    p = await proxy([b], TRUST)
    reply = await exchange(p.port, header + REQUEST)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    rec = b.requests[-1]
    assert rec.one("X-Forwarded-For") == "203.0.113.7"


async def test_client_ip_routing_follows_the_headers_address(backends, proxy):
    bs = await backends("a", "b", "c")
    p = await proxy(bs, {**TRUST, "routing": {"no_key": "client-ip"}})
    request = b"GET /x HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
    for ip in ("203.0.113.1", "203.0.113.2", "198.51.100.9"):
        reply = await exchange(p.port, f"PROXY TCP4 {ip} 10.0.0.1 5000 80\r\n".encode() + request)
        assert reply.startswith(b"HTTP/1.1 200")
        got = [r for x in bs for r in x.requests if r.one("X-Forwarded-For") == ip]
        assert len(got) == 1 and got[0].one("X-Sticky-Backend") == p.pref(ip)[0]


@pytest.mark.parametrize(
    "data",
    [
        REQUEST,  # no header at all
        b"PROXY TCP4 203.0.113.7 10.0.0.1 051000 80\r\n" + REQUEST,  # a leading zero
        b"PROXY TCP9 1 2 3 4\r\n" + REQUEST,
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12 + REQUEST,  # UDP
    ],
)
async def test_a_trusted_peer_without_a_valid_header_is_closed_unanswered(backends, proxy, data):
    (b,) = await backends("app")
    p = await proxy([b], TRUST)
    assert await exchange(p.port, data) == b""
    assert b.requests == []


async def test_an_untrusted_peers_header_is_never_honoured(backends, proxy):
    (b,) = await backends("app")
    p = await proxy([b], TRUST)
    reply = await exchange(
        p.port, b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n" + REQUEST, local="127.0.0.2"
    )
    assert reply.startswith(b"HTTP/1.1 400"), reply[:100]
    assert b.requests == []
    # an untrusted peer's plain request is served, with its own address
    reply = await exchange(p.port, REQUEST, local="127.0.0.2")
    assert reply.startswith(b"HTTP/1.1 200")
    assert b.requests[-1].one("X-Forwarded-For") == "127.0.0.2"


async def test_a_trusted_peer_that_says_nothing_is_closed_at_the_header_deadline(backends, proxy):
    (b,) = await backends("app")
    p = await proxy([b], {**TRUST, "timeouts": {"client_header": "300ms"}})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        assert await asyncio.wait_for(reader.read(), IO_TIMEOUT) == b""
    finally:
        writer.close()


def test_proxy_protocol_needs_trusted_proxies():
    from stickyproxy.config import ConfigError, loads

    with pytest.raises(ConfigError, match="listen.proxy_protocol: needs listen.trusted_proxies"):
        loads(
            "[listen]\nproxy_protocol = true\n[admin]\nenabled = false\n"
            '[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n'
        )
