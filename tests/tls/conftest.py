"""Fixtures for the TLS tests: certificates made by trustme, written to files as an
operator would have them, and a real TLS listener on 127.0.0.1 under uvloop (the loop the
proxy runs on) built from ``stickyproxy.tls``.

The listener's protocol answers each line with "<server name or ->:<client identity or ->"
so a test sees from the client side which certificate it was given (the peer certificate)
and from the server side what identity it read."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import uvloop

from stickyproxy import tls

# Upper bound on any single network wait in these tests.
IO_TIMEOUT = 5.0


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class Files:
    cert: str
    key: str


def write_leaf(leaf: trustme.LeafCert, directory: Path, stem: str) -> Files:
    cert = directory / f"{stem}.crt"
    key = directory / f"{stem}.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return Files(str(cert), str(key))


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> dict[str, Files]:
    """default (localhost), exact (a.example.com), wild (*.wild.example.com), and the CA."""
    out = {
        "default": write_leaf(ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "default"),
        "exact": write_leaf(ca.issue_cert("a.example.com"), tmp_path, "exact"),
        "wild": write_leaf(ca.issue_cert("*.wild.example.com"), tmp_path, "wild"),
    }
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return out


def client_ctx(ca: trustme.CA, *, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if client is not None:
        client.configure_cert(ctx)
    return ctx


class Echo(asyncio.Protocol):
    """Answers each chunk with "<sni>:<identity>\\n"; counts connections made."""

    made = 0

    def __init__(self, kind: str):
        self.kind = kind

    def connection_made(self, transport):
        Echo.made += 1
        self.transport = transport
        obj = transport.get_extra_info("ssl_object")
        self.sni = tls.sni_name(obj) or "-"
        self.identity = tls.client_identity(obj, self.kind) or "-"

    def data_received(self, data):
        self.transport.write(f"{self.sni}:{self.identity}\n".encode())


@dataclass
class Listener:
    store: tls.CertStore
    server: asyncio.AbstractServer
    port: int


async def listen(settings: tls.ListenTLS, store: tls.CertStore | None = None) -> Listener:
    """Listen the way the proxy does: one SSLContext for the listener's life, the
    handshake timeout given to create_server."""
    store = store or tls.CertStore(settings)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Echo(settings.identity),
        "127.0.0.1",
        0,
        ssl=store.context,
        ssl_handshake_timeout=settings.handshake_timeout,
        ssl_shutdown_timeout=tls.SHUTDOWN_TIMEOUT,
    )
    port = server.sockets[0].getsockname()[1]
    return Listener(store, server, port)


@pytest.fixture
async def serve() -> AsyncIterator:
    made: list[Listener] = []

    async def start(settings: tls.ListenTLS, store: tls.CertStore | None = None) -> Listener:
        lst = await listen(settings, store)
        made.append(lst)
        return lst

    yield start
    for lst in made:
        lst.server.close()


async def ask(port: int, ctx: ssl.SSLContext, server_hostname: str | None = "localhost"):
    """Open a TLS connection, send one line, return (answer, peer certificate, writer)."""
    async with asyncio.timeout(IO_TIMEOUT):
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname
        )
        w.write(b"?\n")
        answer = await r.readline()
    return answer.decode(), w.get_extra_info("peercert"), (r, w)


def sans(peercert: dict) -> set[str]:
    return {v for t, v in peercert.get("subjectAltName", ()) if t == "DNS"}
