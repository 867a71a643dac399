"""TLS to backends: stickyproxy.tls.client_context against real TLS servers on 127.0.0.1,
and the one-line reasons describe_verify_error gives for refused certificates (what the
data plane puts in its 502)."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from typing import ClassVar

import pytest
import trustme

from stickyproxy import tls
from stickyproxy.config import ConfigError

from .conftest import IO_TIMEOUT, write_leaf


class Backend(asyncio.Protocol):
    seen: ClassVar[list[str | None]] = []

    def connection_made(self, transport):
        self.transport = transport
        obj = transport.get_extra_info("ssl_object")
        Backend.seen.append(tls.client_identity(obj) if obj is not None else None)

    def data_received(self, data):
        self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")


async def backend(leaf: trustme.LeafCert | None, client_ca: trustme.CA | None = None) -> int:
    ctx = None
    if leaf is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
    server = await asyncio.get_running_loop().create_server(Backend, "127.0.0.1", 0, ssl=ctx)
    return server.sockets[0].getsockname()[1]


async def connect(port: int, settings: tls.BackendTLS, url_host: str = "localhost") -> bytes:
    """Connect as the data plane will: the client context, SNI from the settings or the
    URL's host; send a request and return the answer."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    class Up(asyncio.Protocol):
        def data_received(self, data):
            if not answer.done():
                answer.set_result(data)

        def connection_lost(self, exc):
            if not answer.done():
                answer.set_exception(exc or ConnectionResetError("closed"))

    async with asyncio.timeout(IO_TIMEOUT):
        transport, _ = await loop.create_connection(
            Up,
            "127.0.0.1",
            port,
            ssl=tls.client_context(settings),
            server_hostname=tls.server_hostname(settings, url_host),
        )
        assert transport.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "http/1.1")
        transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return await answer
        finally:
            transport.close()


def trusting(ca: trustme.CA, tmp_path, **kw) -> tls.BackendTLS:
    path = tmp_path / "backend-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return tls.BackendTLS(ca_file=str(path), **kw)


async def test_verified_backend(ca, tmp_path):
    port = await backend(ca.issue_cert("localhost"))
    assert (await connect(port, trusting(ca, tmp_path))).startswith(b"HTTP/1.1 204")


async def test_server_name_override_and_ip_address_names(ca, tmp_path):
    port = await backend(ca.issue_cert("api.internal", "127.0.0.1"))
    assert await connect(port, trusting(ca, tmp_path, server_name="api.internal"), "localhost")
    assert await connect(port, trusting(ca, tmp_path), "127.0.0.1")  # the IP SAN


PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
FUTURE = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("expired", "TLS: certificate has expired"),
        ("not_yet_valid", "TLS: certificate is not yet valid"),
        ("wrong_host", "TLS: certificate is not valid for 'localhost'"),
        ("wrong_ip", "TLS: certificate is not valid for '127.0.0.1'"),
        ("untrusted", "TLS: certificate not trusted (issuer unknown)"),
        ("system_store", "TLS: certificate not trusted (issuer unknown)"),
        ("plain_http", "TLS: not a TLS server (plain HTTP?)"),
    ],
)
async def test_refused_backend_certificates_have_a_clear_reason(ca, tmp_path, case, reason):
    settings = trusting(ca, tmp_path)
    host = "localhost"
    if case == "expired":
        port = await backend(
            ca.issue_cert(
                "localhost", not_before=PAST - datetime.timedelta(days=30), not_after=PAST
            )
        )
    elif case == "not_yet_valid":
        port = await backend(ca.issue_cert("localhost", not_before=FUTURE))
    elif case == "wrong_host":
        port = await backend(ca.issue_cert("other.example"))
    elif case == "wrong_ip":
        port = await backend(ca.issue_cert("localhost"))
        host = "127.0.0.1"
    elif case == "untrusted":
        port = await backend(trustme.CA().issue_cert("localhost"))
    elif case == "system_store":
        port = await backend(ca.issue_cert("localhost"))
        settings = tls.BackendTLS()  # verify against the system store
    else:
        port = await backend(None)
    with pytest.raises((ssl.SSLError, ConnectionError)) as e:
        await connect(port, settings, host)
    assert tls.describe_verify_error(e.value) == reason
    if case != "plain_http":
        assert isinstance(e.value, ssl.SSLCertVerificationError)


async def test_verify_false_accepts_any_certificate(tmp_path):
    port = await backend(trustme.CA().issue_cert("elsewhere.example"))
    assert await connect(port, tls.BackendTLS(verify=False))


async def test_client_certificate_to_the_backend(ca, tmp_path):
    clients = trustme.CA()
    me = write_leaf(
        clients.issue_cert("proxy@edge", common_name="stickyproxy-edge"), tmp_path, "me"
    )
    port = await backend(ca.issue_cert("localhost"), client_ca=clients)
    Backend.seen.clear()
    assert await connect(port, trusting(ca, tmp_path, cert=me.cert, key=me.key))
    assert Backend.seen == ["stickyproxy-edge"]
    # without it, the backend refuses: it never sees a connection
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await connect(port, trusting(ca, tmp_path))
    assert Backend.seen == ["stickyproxy-edge"]


def test_client_context_load_errors_name_the_key(ca, tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_bytes(b"not a certificate")
    with pytest.raises(ConfigError) as e:
        tls.client_context(tls.BackendTLS(ca_file=str(bad)), path="backends[1].tls")
    assert e.value.errors[0].startswith("backends[1].tls.ca_file: ")
    other = ca.issue_cert("x")
    cert = write_leaf(other, tmp_path, "c")
    with open(cert.key, "wb") as f:
        f.write(ca.issue_cert("y").private_key_pem.bytes())
    with pytest.raises(ConfigError) as e:
        tls.client_context(tls.BackendTLS(cert=cert.cert, key=cert.key), path="backends[1].tls")
    why = "the private key does not belong to the certificate"
    assert e.value.errors == [f"backends[1].tls.key: {cert.key!r}: {why}"]


@pytest.mark.parametrize("keep_first", [True, False])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_pool_connections_resume_the_session(ca, tmp_path, version, keep_first):
    port = await backend(ca.issue_cert("localhost"))
    settings = trusting(ca, tmp_path)
    ctx = tls.client_context(settings)
    ctx.maximum_version = version
    cache = tls.session_cache(ctx)
    assert cache is not None
    loop = asyncio.get_running_loop()
    reused = []
    for _ in range(3):
        async with asyncio.timeout(IO_TIMEOUT):
            got = loop.create_future()

            class Up(asyncio.Protocol):
                def __init__(self, got=got):
                    self.got = got

                def data_received(self, data):
                    if not self.got.done():
                        self.got.set_result(data)

            transport, _ = await loop.create_connection(
                Up, "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
            transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await got  # a TLS 1.3 ticket arrives after the handshake
            obj = transport.get_extra_info("ssl_object")
            reused.append(obj.session_reused)
            assert obj.version() == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
            # the first connection stays open (a pool keeps it) while the next one starts,
            # or is closed first (its session is kept when it is freed)
            if len(reused) > 1 or not keep_first:
                transport.close()
                await asyncio.sleep(0)
    assert reused == [False, True, True]
    assert (cache.offered, cache.resumed) == (2, 2)


async def test_health_checks_through_aiohttp_use_the_same_context(ca, tmp_path):
    """The control plane's aiohttp client verifies a backend the same way: one session for
    every backend, the context from client_context and the expected name given per request."""
    import aiohttp
    from aiohttp import web

    app = web.Application()

    async def health(request):
        return web.Response(text="ok")

    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.internal").configure_cert(server_ctx)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        good = trusting(ca, tmp_path, server_name="api.internal")
        wrong = "TLS: certificate is not valid for '127.0.0.1'"
        for settings, expect in ((good, "ok"), (trusting(ca, tmp_path), wrong)):
            ctx = tls.client_context(settings)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True)
            ) as s:
                try:
                    async with s.get(
                        f"https://127.0.0.1:{port}/health",
                        ssl=ctx,
                        server_hostname=tls.server_hostname(settings, "127.0.0.1"),
                        timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT),
                    ) as resp:
                        got = await resp.text()
                except aiohttp.ClientSSLError as e:  # wraps the ssl error
                    got = tls.describe_verify_error(e)
            assert got == expect
    finally:
        await runner.cleanup()
