"""TLS through the real proxy: clients over [listen.tls] (SNI, reload without dropping
connections, mTLS and the client-cert key source, refusals), and https:// backends
(verified, refused with a clear 502 reason, health-checked, WebSocket tunnels)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from stickyproxy.config import loads
from stickyproxy.control.server import Service

from .conftest import IO_TIMEOUT, client_ctx, write_leaf

LOCAL = "127.0.0.1"


def toml(listen_tls: str = "", backends: str = "", extra: str = "") -> str:
    return f"""
[listen]
host = "{LOCAL}"
port = 0
{listen_tls}
[admin]
enabled = false
[health]
enabled = false
[timeouts]
connect = "2s"
[logging]
level = "error"
{extra}
{backends}
"""


async def start(tmp_path: Path, text: str) -> Service:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    svc = Service(loads(text, str(path)), str(path))
    await svc.start()
    return svc


def plain_backends(bs) -> str:
    return "".join(f'[[backends]]\nid = "{b.id}"\nurl = "{b.url}"\n' for b in bs)


async def get(
    port: int,
    ctx: ssl.SSLContext | None,
    *,
    user: str = "u1",
    server_hostname: str = "localhost",
    headers: dict | None = None,
):
    """One HTTP/1.1 GET over a new (TLS) connection: (status, headers, body, peer cert)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            LOCAL, port, ssl=ctx, server_hostname=server_hostname if ctx else None
        ),
        IO_TIMEOUT,
    )
    try:
        h = {"Host": "shop", "X-User-Id": user, "Connection": "close", **(headers or {})}
        writer.write(
            b"GET / HTTP/1.1\r\n"
            + b"".join(f"{k}: {v}\r\n".encode() for k, v in h.items())
            + b"\r\n"
        )
        data = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        peer = writer.get_extra_info("peercert")
    finally:
        writer.close()
    if not data:
        raise ConnectionResetError("closed without an answer")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, fields, body, peer


def sans(peer) -> set[str]:
    return {v for _, v in peer.get("subjectAltName", ())}


# -- the listener ---------------------------------------------------------------------------


async def test_https_clients_are_served_and_backends_told_so(backends, certs, ca, tmp_path):
    (b,) = await backends("app")
    svc = await start(
        tmp_path,
        toml(
            f'[listen.tls]\ncert = "{certs["default"].cert}"\nkey = "{certs["default"].key}"\n'
            f'[[listen.tls.sni]]\nnames = ["a.example.com"]\ncert = "{certs["exact"].cert}"\n'
            f'key = "{certs["exact"].key}"\n',
            plain_backends([b]),
        ),
    )
    try:
        status, fields, _, peer = await get(svc.proxy.port, client_ctx(ca))
        assert status == 200 and fields["x-backend"] == "app"
        assert "localhost" in sans(peer)
        rec = b.requests[-1]
        assert rec.one("X-Forwarded-Proto") == "https"
        # SNI picks the certificate
        _, _, _, peer = await get(svc.proxy.port, client_ctx(ca), server_hostname="a.example.com")
        assert sans(peer) == {"a.example.com"}
        # plain HTTP on the TLS port is closed without an answer, and does not hang
        reader, writer = await asyncio.open_connection(LOCAL, svc.proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), IO_TIMEOUT) == b""
        writer.close()
        # TLS 1.1 is refused
        old = client_ctx(ca)
        old.minimum_version = ssl.TLSVersion.TLSv1_1  # noqa: the version under test
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await get(svc.proxy.port, old)
        from prometheus_client import generate_latest

        text = generate_latest(await svc.metrics_registry()).decode()
        assert 'stickyproxy_tls_handshakes_total{result="completed"} 2.0' in text, text
        assert "stickyproxy_tls_handshakes_in_progress 0.0" in text
    finally:
        await svc.stop()


async def test_a_reload_swaps_the_certificate_without_dropping_connections_or_requests(
    backends, certs, ca, tmp_path
):
    (b,) = await backends("app")
    text = toml(
        f'[listen.tls]\ncert = "{certs["default"].cert}"\nkey = "{certs["default"].key}"\n',
        plain_backends([b]),
    )
    svc = await start(tmp_path, text)
    try:
        port = svc.proxy.port
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx(ca)))
        failures: list[str] = []
        stop = asyncio.Event()

        async def load():
            n = 0
            while not stop.is_set() and n < 3000:
                n += 1
                async with session.get(
                    f"https://localhost:{port}/", headers={"X-User-Id": f"u{n % 50}"}
                ) as r:
                    if r.status != 200:
                        failures.append(str(r.status))
                    await r.read()

        task = asyncio.create_task(load())
        newer = ca.issue_cert("localhost", "127.0.0.1", common_name="renewed")
        files = write_leaf(newer, tmp_path, "renewed")
        # the operator replaces the files in place, then reloads
        Path(certs["default"].cert).write_bytes(Path(files.cert).read_bytes())
        Path(certs["default"].key).write_bytes(Path(files.key).read_bytes())
        ok, problems = await svc.reload("test")
        assert ok and problems == []
        _, _, _, peer = await get(port, client_ctx(ca))
        assert ("commonName", "renewed") in [x for rdn in peer["subject"] for x in rdn]
        stop.set()
        await task
        await session.close()
        assert failures == []
    finally:
        await svc.stop()


async def test_mtls_identity_is_the_key_and_reaches_the_backend(backends, certs, ca, tmp_path):
    bs = await backends("app-a", "app-b", "app-c")
    svc = await start(
        tmp_path,
        toml(
            f'[listen.tls]\ncert = "{certs["default"].cert}"\nkey = "{certs["default"].key}"\n'
            f'client_auth = "require"\nclient_ca = "{tmp_path / "ca.pem"}"\nidentity = "cn"\n',
            plain_backends(bs),
            '[routing]\nkeys = [{ from = "client-cert" }]\n',
        ),
    )
    try:
        seen = {}
        for name in ("svc-orders", "svc-billing", "svc-search", "svc-orders"):
            leaf = ca.issue_cert(f"{name}.internal", common_name=name)
            status, fields, _, _ = await get(
                svc.proxy.port,
                client_ctx(ca, client=leaf),
                headers={"X-Sticky-Client-Cert": "forged", "X-User-Id": "ignored"},
            )
            assert status == 200
            seen.setdefault(name, set()).add(fields["x-backend"])
        assert all(len(v) == 1 for v in seen.values())  # one identity, one backend
        recs = [r for b in bs for r in b.requests]
        assert {r.one("X-Sticky-Client-Cert") for r in recs} == {
            "svc-orders",
            "svc-billing",
            "svc-search",
        }
        assert {r.one("X-Sticky-Key") for r in recs} == {"svc-orders", "svc-billing", "svc-search"}
        # no client certificate: the handshake is refused
        with pytest.raises((ssl.SSLError, ConnectionError)):
            status, *_ = await get(svc.proxy.port, client_ctx(ca))
            assert status != 200
    finally:
        await svc.stop()


def test_client_cert_keys_need_client_certificates(tmp_path):
    from stickyproxy.config import ConfigError

    with pytest.raises(ConfigError, match=r'routing.keys\[0\].from: "client-cert" needs'):
        loads(
            toml(
                backends='[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n',
                extra='[routing]\nkeys = [{ from = "client-cert" }]\n',
            )
        )


# -- https:// backends -----------------------------------------------------------------------


async def tls_backend(leaf: trustme.LeafCert, name: str):
    """An aiohttp app over TLS with ``leaf``: echoes its name; /ws is a WebSocket echo."""

    async def hello(request):
        return web.Response(text=name, headers={"X-Backend": name})

    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(f"{name}:{msg.data}")
        return sock

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    site = web.TCPSite(runner, LOCAL, 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def test_https_backends_are_verified_and_refusals_say_why(ca, tmp_path):
    good, good_port = await tls_backend(ca.issue_cert("localhost", "127.0.0.1"), "good")
    other = trustme.CA()  # a CA the proxy does not trust
    bad, bad_port = await tls_backend(other.issue_cert("localhost", "127.0.0.1"), "bad")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    backends = (
        f'[[backends]]\nid = "good"\nurl = "https://localhost:{good_port}"\n'
        f'[backends.tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
        f'[[backends]]\nid = "bad"\nurl = "https://localhost:{bad_port}"\n'
        f'[backends.tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
    )
    svc = await start(tmp_path, toml(backends=backends, extra="[retries]\nattempts = 0\n"))
    try:
        ring = svc.table.router.ring
        to_good = next(u for u in (f"u{i}" for i in range(500)) if ring.owner(u) == "good")
        to_bad = next(u for u in (f"u{i}" for i in range(500)) if ring.owner(u) == "bad")
        status, fields, body, _ = await get(svc.proxy.port, None, user=to_good)
        assert status == 200 and body == b"good"
        status, fields, body, _ = await get(svc.proxy.port, None, user=to_bad)
        assert status == 502
        assert b"TLS: certificate not trusted" in body, body
        counters = svc.observer.stats.counters["upstream_errors"]
        assert counters.get(("bad", "tls"), 0) >= 1
    finally:
        await svc.stop()
        await good.cleanup()
        await bad.cleanup()


async def test_websocket_over_tls_on_both_sides(ca, certs, tmp_path):
    runner, port = await tls_backend(ca.issue_cert("localhost", "127.0.0.1"), "ws-app")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    svc = await start(
        tmp_path,
        toml(
            f'[listen.tls]\ncert = "{certs["default"].cert}"\nkey = "{certs["default"].key}"\n',
            f'[[backends]]\nid = "ws-app"\nurl = "https://localhost:{port}"\n'
            f'[backends.tls]\nca_file = "{tmp_path / "ca.pem"}"\n',
        ),
    )
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(
                f"wss://localhost:{svc.proxy.port}/ws",
                headers={"X-User-Id": "u1"},
                ssl=client_ctx(ca),
            ) as ws:
                for i in range(3):
                    await ws.send_str(f"m{i}")
                    msg = await asyncio.wait_for(ws.receive(), IO_TIMEOUT)
                    assert msg.data == f"ws-app:m{i}"
    finally:
        await svc.stop()
        await runner.cleanup()


async def test_health_checks_use_the_backends_tls_settings(ca, tmp_path):
    runner, port = await tls_backend(ca.issue_cert("localhost", "127.0.0.1"), "app")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = toml(
        backends=f'[[backends]]\nid = "app"\nurl = "https://localhost:{port}"\n'
        f'[backends.tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
    )
    text = text.replace(
        "[health]\nenabled = false",
        '[health]\ninterval = "100ms"\ntimeout = "100ms"\nrise = 1\nfall = 1',
    )
    svc = await start(tmp_path, text)
    try:
        checks = svc.process.control.stats.counters["health_checks"]
        deadline = asyncio.get_running_loop().time() + IO_TIMEOUT
        while checks.get(("app", "success"), 0) < 2:
            assert asyncio.get_running_loop().time() < deadline, checks
            await asyncio.sleep(0.05)
        assert checks.get(("app", "failure"), 0) == 0
    finally:
        await svc.stop()
        await runner.cleanup()


async def test_a_renewed_certificate_is_served_without_a_reload_signal(
    backends, certs, ca, tmp_path
):
    (b,) = await backends("app")
    svc = await start(
        tmp_path,
        toml(
            f'[listen.tls]\ncert = "{certs["default"].cert}"\nkey = "{certs["default"].key}"\n',
            plain_backends([b]),
        ),
    )
    try:
        assert svc.watcher is not None  # certificates are always followed
        await asyncio.wait_for(svc.watching.wait(), IO_TIMEOUT)
        renewed = write_leaf(
            ca.issue_cert("localhost", "127.0.0.1", common_name="renewed"), tmp_path, "renewed"
        )
        # a renewal tool writes new files and renames them into place
        for src, dst in (
            (renewed.cert, certs["default"].cert),
            (renewed.key, certs["default"].key),
        ):
            tmp = Path(dst + ".new")
            tmp.write_bytes(Path(src).read_bytes())
            tmp.replace(dst)
        deadline = asyncio.get_running_loop().time() + 3 * IO_TIMEOUT
        while True:
            _, _, _, peer = await get(svc.proxy.port, client_ctx(ca))
            if ("commonName", "renewed") in [x for rdn in peer["subject"] for x in rdn]:
                break
            assert asyncio.get_running_loop().time() < deadline, "renewed certificate not served"
            await asyncio.sleep(0.1)
    finally:
        await svc.stop()


@pytest.mark.parametrize(
    "case, reason",
    [
        ("expired", b"TLS: certificate has expired"),
        ("wrong host", b"TLS: certificate is not valid for 'localhost'"),
    ],
)
async def test_a_refused_backend_certificate_is_a_502_that_says_why(ca, tmp_path, case, reason):
    import datetime

    if case == "expired":
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=60)
        leaf = ca.issue_cert(
            "localhost", not_before=past - datetime.timedelta(days=30), not_after=past
        )
    else:
        leaf = ca.issue_cert("elsewhere.example")
    runner, port = await tls_backend(leaf, "app")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    svc = await start(
        tmp_path,
        toml(
            backends=f'[[backends]]\nid = "app"\nurl = "https://localhost:{port}"\n'
            f'[backends.tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
        ),
    )
    try:
        status, _, body, _ = await get(svc.proxy.port, None)
        assert status == 502
        assert reason in body, body
    finally:
        await svc.stop()
        await runner.cleanup()


async def test_a_backend_ca_renewed_in_place_is_taken_by_the_next_reload(ca, tmp_path):
    """The backend moves to a certificate of a new CA; the operator writes that CA over
    the same ca_file and reloads: the proxy (and its health checks) trust it from then."""
    new_ca = trustme.CA()
    runner, port = await tls_backend(new_ca.issue_cert("localhost", "127.0.0.1"), "renewed")
    ca_file = tmp_path / "backend-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))  # the old CA: the backend's certificate fails
    backends = (
        f'[[backends]]\nid = "renewed"\nurl = "https://localhost:{port}"\n'
        f'[backends.tls]\nca_file = "{ca_file}"\n'
    )
    svc = await start(tmp_path, toml(backends=backends, extra="[retries]\nattempts = 0\n"))
    try:
        status, _, body, _ = await get(svc.proxy.port, None)
        assert status == 502 and b"TLS: certificate not trusted" in body, body
        new_ca.cert_pem.write_to_path(str(ca_file))
        ok, problems = await svc.reload("test")
        assert ok, problems
        status, _, body, _ = await get(svc.proxy.port, None)
        assert status == 200 and body == b"renewed", body
    finally:
        await svc.stop()
        await runner.cleanup()
