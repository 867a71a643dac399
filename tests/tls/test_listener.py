"""Real handshakes against a TLS listener built from stickyproxy.tls (uvloop, 127.0.0.1):
certificate selection by SNI, reload without dropping connections, refused protocol
versions, plain HTTP on the TLS port, client certificates, load errors, the handshake cap."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from stickyproxy import tls
from stickyproxy.config import ConfigError

from .conftest import IO_TIMEOUT, Echo, ask, client_ctx, sans, write_leaf


async def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """Whether the listener refused this client: the handshake failed, or (TLS 1.3, where
    the client finishes first and the server judges its certificate after) the connection
    was closed before an answer."""
    try:
        answer, _, (_, w) = await ask(port, ctx)
    except (ssl.SSLError, ConnectionError):
        return True
    w.close()
    return answer == ""


def settings(certs, **kw) -> tls.ListenTLS:
    d = certs["default"]
    return tls.ListenTLS(cert=d.cert, key=d.key, **kw)


def with_sni(certs, **kw) -> tls.ListenTLS:
    return settings(
        certs,
        sni=(
            tls.SniCert(("a.example.com",), certs["exact"].cert, certs["exact"].key),
            tls.SniCert(("*.wild.example.com",), certs["wild"].cert, certs["wild"].key),
        ),
        **kw,
    )


async def test_handshake_modern_defaults(ca, certs, serve):
    lst = await serve(settings(certs))
    answer, peer, (_, w) = await ask(lst.port, client_ctx(ca))
    assert answer == "localhost:-\n"
    obj = w.get_extra_info("ssl_object")
    assert obj.version() in ("TLSv1.2", "TLSv1.3")
    assert obj.selected_alpn_protocol() is None  # the client offered none
    assert obj.compression() is None
    assert "localhost" in sans(peer)
    w.close()
    ctx = client_ctx(ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    _, _, (_, w) = await ask(lst.port, ctx)
    assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    w.close()
    opts = lst.store.context.options
    assert opts & ssl.OP_NO_COMPRESSION and opts & ssl.OP_NO_RENEGOTIATION
    assert lst.store.gate.completed == 2 and lst.store.gate.in_progress == 0


@pytest.mark.parametrize(
    "server_name, expected_san",
    [
        ("a.example.com", "a.example.com"),
        ("x.wild.example.com", "*.wild.example.com"),
        ("localhost", "localhost"),
    ],
)
async def test_sni_picks_the_certificate(ca, certs, serve, server_name, expected_san):
    lst = await serve(with_sni(certs))
    answer, peer, (_, w) = await ask(lst.port, client_ctx(ca), server_name)
    assert sans(peer) == {expected_san} or expected_san in sans(peer)
    assert answer.startswith(server_name)
    w.close()


async def test_unknown_or_absent_server_name_gets_the_default(ca, certs, serve):
    lst = await serve(with_sni(certs))
    ctx = client_ctx(ca)
    ctx.check_hostname = False
    for name in ("deep.x.wild.example.com", None):
        _, peer, (_, w) = await ask(lst.port, ctx, name)
        assert "localhost" in sans(peer)
        w.close()


async def test_reload_swaps_the_certificate_and_keeps_open_connections(ca, certs, serve, tmp_path):
    lst = await serve(settings(certs))
    _, peer1, (r1, w1) = await ask(lst.port, client_ctx(ca))
    # the operator replaces the files (a new certificate for the same names)
    new = ca.issue_cert("localhost", "127.0.0.1", "renewed.example.com")
    staged = write_leaf(new, tmp_path, "staged")
    import os

    os.replace(staged.cert, certs["default"].cert)
    os.replace(staged.key, certs["default"].key)
    assert lst.store.files_changed()
    result = lst.store.reload()
    assert result == tls.ReloadResult(True, ())
    assert not lst.store.files_changed()
    # a new handshake gets the new certificate ...
    _, peer2, (_, w2) = await ask(lst.port, client_ctx(ca))
    assert "renewed.example.com" in sans(peer2) and "renewed.example.com" not in sans(peer1)
    assert peer2["serialNumber"] != peer1["serialNumber"]
    w2.close()
    # ... and the connection opened before carries on with its session
    async with asyncio.timeout(IO_TIMEOUT):
        w1.write(b"again\n")
        assert await r1.readline() == b"localhost:-\n"
    assert w1.get_extra_info("peercert")["serialNumber"] == peer1["serialNumber"]
    w1.close()
    # nothing changed: nothing swapped
    assert lst.store.reload() == tls.ReloadResult(False, ())


async def test_failed_reload_keeps_the_old_certificate(ca, certs, serve):
    lst = await serve(settings(certs))
    _, before, (_, w) = await ask(lst.port, client_ctx(ca))
    w.close()
    Path(certs["default"].key).write_bytes(
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"
    )
    result = lst.store.reload()
    assert not result.changed
    assert result.errors and result.errors[0].startswith("listen.tls.key: ")
    _, after, (_, w) = await ask(lst.port, client_ctx(ca))
    assert after["serialNumber"] == before["serialNumber"]
    w.close()


async def test_apply_new_settings_in_place(ca, certs, serve):
    lst = await serve(settings(certs))
    r = lst.store.apply(with_sni(certs, min_version="1.3"))
    assert r.changed and not r.errors
    _, peer, (_, w) = await ask(lst.port, client_ctx(ca), "a.example.com")
    assert "a.example.com" in sans(peer)
    assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
    w.close()
    legacy = client_ctx(ca)
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    failed = lst.store.gate.admitted - lst.store.gate.completed
    with pytest.raises(ConnectionError):
        await ask(lst.port, legacy)
    assert lst.store.gate.admitted - lst.store.gate.completed == failed + 1


def old_client(ca, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = client_ctx(ca)
    # let this client offer TLS 1.0/1.1 at all (OpenSSL 3 refuses them at security level 1+),
    # so what refuses them in the test is the server
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = version
    ctx.maximum_version = version
    return ctx


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
async def test_tls_1_0_and_1_1_are_refused(ca, certs, serve, version):
    lst = await serve(settings(certs))
    made = Echo.made
    gate = lst.store.gate
    # asyncio's TLS (CPython's and uvloop's) closes a connection whose handshake failed
    # without sending the alert OpenSSL wrote (RFC 8446 §6.2 protocol_version): the client
    # sees the connection reset, not the alert
    with pytest.raises(ConnectionError) as e:
        await ask(lst.port, old_client(ca, version))
    assert tls.describe_verify_error(e.value) == "TLS: connection closed during the handshake"
    # the server read this client's hello and refused it (the client did not give up alone)
    assert (gate.admitted, gate.completed, gate.in_progress) == (1, 0, 0)
    assert Echo.made == made


async def test_plain_http_on_the_tls_port_is_closed(certs, serve):
    lst = await serve(settings(certs))
    made = Echo.made
    t0 = time.monotonic()
    async with asyncio.timeout(IO_TIMEOUT):
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        rest = await r.read()
    assert b"HTTP/1.1 200" not in rest
    assert time.monotonic() - t0 < 1.0  # at once, not at the handshake timeout
    assert Echo.made == made
    w.close()
    assert lst.store.gate.in_progress == 0


async def test_silent_client_is_closed_at_the_handshake_timeout(certs, serve):
    lst = await serve(settings(certs, handshake_timeout=0.3))
    async with asyncio.timeout(IO_TIMEOUT):
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        t0 = time.monotonic()
        assert await r.read() == b""
    assert 0.25 < time.monotonic() - t0 < 2.0
    w.close()


async def test_handshake_cap(ca, certs, serve):
    lst = await serve(settings(certs, max_handshakes=2))
    gate = lst.store.gate
    loop = asyncio.get_running_loop()
    # two clients that connect and never say hello hold both slots
    idle = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", lst.port))
        s.setblocking(False)
        idle.append(s)
    deadline = time.monotonic() + IO_TIMEOUT
    while gate.in_progress < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    # a third is closed before its ClientHello is read
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await ask(lst.port, client_ctx(ca))
    assert gate.refused == 1
    # freed slots are used again at once (uvloop frees an abandoned handshake's SSL object
    # when its connection closes)
    for s in idle:
        s.close()
    while gate.in_progress:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    _, _, (_, w) = await ask(lst.port, client_ctx(ca))
    w.close()
    assert gate.completed == 1
    del loop


async def test_mtls_require(ca, certs, serve, tmp_path):
    client = ca.issue_cert("svc@shop.example", common_name="svc-orders")
    s = settings(certs, client_auth="require", client_ca=str(tmp_path / "ca.pem"))
    lst = await serve(s)
    answer, _, (_, w) = await ask(lst.port, client_ctx(ca, client=client))
    assert answer == "localhost:svc-orders\n"
    w.close()
    made = Echo.made
    # without a certificate: TLS 1.3 finishes the client's side first, so the refusal
    # (certificate_required, RFC 8446 §4.4.2.4) arrives on the first read
    assert await refused(lst.port, client_ctx(ca))
    # a certificate from a CA the listener does not trust
    other = trustme.CA().issue_cert("x@y", common_name="intruder")
    assert await refused(lst.port, client_ctx(ca, client=other))
    assert Echo.made == made


async def test_mtls_request(ca, certs, serve, tmp_path):
    client = ca.issue_cert("svc@shop.example", common_name="svc-orders")
    s = settings(certs, client_auth="request", client_ca=str(tmp_path / "ca.pem"), identity="email")
    lst = await serve(s)
    answer, _, (_, w) = await ask(lst.port, client_ctx(ca, client=client))
    assert answer == "localhost:svc@shop.example\n"
    w.close()
    answer, _, (_, w) = await ask(lst.port, client_ctx(ca))
    assert answer == "localhost:-\n"  # no certificate: served, no identity
    w.close()
    other = trustme.CA().issue_cert("x@y", common_name="intruder")
    assert await refused(lst.port, client_ctx(ca, client=other))  # a certificate sent must verify


async def test_reload_replaces_the_client_ca(ca, certs, serve, tmp_path):
    client = ca.issue_cert("a@b", common_name="old-ca-client")
    s = settings(certs, client_auth="require", client_ca=str(tmp_path / "ca.pem"))
    lst = await serve(s)
    answer, _, (_, w) = await ask(lst.port, client_ctx(ca, client=client))
    assert answer == "localhost:old-ca-client\n"
    w.close()
    new_ca = trustme.CA()
    new_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    assert lst.store.reload().changed
    assert await refused(lst.port, client_ctx(ca, client=client))
    answer, _, (_, w) = await ask(
        lst.port, client_ctx(ca, client=new_ca.issue_cert("c@d", common_name="new-ca-client"))
    )
    assert answer == "localhost:new-ca-client\n"
    w.close()


@pytest.mark.parametrize(
    "damage, path, words",
    [
        ("garbage_key", "listen.tls.key", "no PEM private key found"),
        ("bad_key_pem", "listen.tls.key", "not a private key OpenSSL can read"),
        ("other_key", "listen.tls.key", "does not belong to the certificate"),
        ("encrypted_key", "listen.tls.key", "encrypted"),
        ("garbage_cert", "listen.tls.cert", "no PEM certificate found"),
        ("missing_key", "listen.tls.key", "cannot read"),
        ("unreadable_key", "listen.tls.key", "cannot read"),
    ],
)
def test_bad_files_are_config_errors_naming_the_key(ca, certs, tmp_path, damage, path, words):
    d = certs["default"]
    import os

    if damage == "garbage_key":
        Path(d.key).write_bytes(b"not a key\n")
    elif damage == "bad_key_pem":
        Path(d.key).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    elif damage == "other_key":
        Path(d.key).write_bytes(ca.issue_cert("other").private_key_pem.bytes())
    elif damage == "encrypted_key":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        k = ec.generate_private_key(ec.SECP256R1())
        Path(d.key).write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    elif damage == "garbage_cert":
        Path(d.cert).write_bytes(b"hello\n")
    elif damage == "missing_key":
        os.unlink(d.key)
    elif damage == "unreadable_key":
        if os.geteuid() == 0:
            # root reads any file: a directory stands in for the unreadable file
            os.unlink(d.key)
            os.mkdir(d.key)
        else:
            os.chmod(d.key, 0)
    with pytest.raises(ConfigError) as e:
        tls.CertStore(settings(certs))
    msg = e.value.errors[0]
    assert msg.startswith(path + ": "), msg
    assert words in msg
    assert "Traceback" not in str(e.value)


def test_sni_entry_errors_name_their_index(ca, certs, tmp_path):
    s = with_sni(certs)
    Path(certs["wild"].key).write_bytes(ca.issue_cert("x").private_key_pem.bytes())
    with pytest.raises(ConfigError) as e:
        tls.CertStore(s)
    assert e.value.errors == [e.value.errors[0]]
    assert e.value.errors[0].startswith("listen.tls.sni[1].key: ")


async def test_one_file_with_key_and_chain(ca, serve, tmp_path):
    leaf = ca.issue_cert("localhost")
    both = tmp_path / "both.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
    lst = await serve(tls.ListenTLS(cert=str(both), key=str(both)))
    _, peer, (_, w) = await ask(lst.port, client_ctx(ca))
    assert "localhost" in sans(peer)
    w.close()


async def tls12_resuming_client(ca, client) -> ssl.SSLContext:
    ctx = client_ctx(ca, client=client)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cache = tls.SessionCache()
    ctx.sslobject_class = cache.sslobject_class
    return ctx


async def test_resumed_session_cannot_outlive_a_client_ca_change(ca, certs, serve, tmp_path):
    # A TLS 1.2 session id carries the verdict on the client certificate made when the
    # session was; after the client CA changes, resuming it is refused.
    client = ca.issue_cert("a@b", common_name="svc")
    lst = await serve(settings(certs, client_auth="require", client_ca=str(tmp_path / "ca.pem")))
    ctx = await tls12_resuming_client(ca, client)
    answer, _, (_, w) = await ask(lst.port, ctx)
    assert answer == "localhost:svc\n" and not w.get_extra_info("ssl_object").session_reused
    w.close()
    answer, _, (_, w) = await ask(lst.port, ctx)
    assert answer == "localhost:svc\n" and w.get_extra_info("ssl_object").session_reused
    w.close()
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))  # the old CA removed
    assert lst.store.reload().changed
    assert await refused(lst.port, ctx)
    assert lst.store.gate.stale == 1


async def test_no_tickets_while_client_certificates_are_verified(ca, certs, serve, tmp_path):
    # TLS 1.3 resumes only by ticket; a listener verifying clients issues none, and a
    # ticket issued before it started verifying (client_auth was "none") is not honoured.
    lst = await serve(settings(certs))
    ctx = client_ctx(ca, client=ca.issue_cert("a@b", common_name="svc"))
    cache = tls.SessionCache()
    ctx.sslobject_class = cache.sslobject_class
    for _ in range(2):
        answer, _, (_, w) = await ask(lst.port, ctx)
        w.close()
        await asyncio.sleep(0)
    assert w.get_extra_info("ssl_object").session_reused  # tickets while "none"
    assert lst.store.apply(
        settings(certs, client_auth="require", client_ca=str(tmp_path / "ca.pem"))
    ).changed
    # the ticket from before is not honoured: a full handshake, the certificate verified
    answer, _, (_, w) = await ask(lst.port, ctx)
    assert answer == "localhost:svc\n"
    assert not w.get_extra_info("ssl_object").session_reused
    w.close()
    fresh = client_ctx(ca, client=ca.issue_cert("a@b", common_name="svc"))
    cache = tls.SessionCache()
    fresh.sslobject_class = cache.sslobject_class
    for _ in range(2):
        answer, _, (_, w) = await ask(lst.port, fresh)
        assert answer == "localhost:svc\n"
        assert not w.get_extra_info("ssl_object").session_reused
        w.close()
        await asyncio.sleep(0)


async def test_reload_under_load_fails_no_handshake(ca, certs, serve, tmp_path):
    """Clients keep handshaking while the certificate is swapped back and forth: every
    handshake succeeds, and both certificates are served."""
    import os

    lst = await serve(settings(certs))
    other = write_leaf(
        ca.issue_cert("localhost", "127.0.0.1", "second.example.com"), tmp_path, "second"
    )
    first = write_leaf(ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "first")
    swaps = [first, other] * 5
    seen: set[str] = set()
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client():
        ctx = client_ctx(ca)
        while not stop.is_set():
            try:
                answer, peer, (_, w) = await ask(lst.port, ctx)
                assert answer == "localhost:-\n"
                seen.add(peer["serialNumber"])
                w.close()
            except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                failures.append(e)

    gate = lst.store.gate

    async def handshakes(n: int) -> None:
        target = gate.completed + n
        deadline = time.monotonic() + IO_TIMEOUT
        while gate.completed < target and not failures:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(client()) for _ in range(8)]
    for files in swaps:
        await handshakes(16)  # at most 8 were in flight at the swap
        for src, dst in ((files.cert, certs["default"].cert), (files.key, certs["default"].key)):
            staged = dst + ".new"
            Path(staged).write_bytes(Path(src).read_bytes())
            os.replace(staged, dst)
        assert lst.store.reload() == tls.ReloadResult(True, ())
    await handshakes(16)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), IO_TIMEOUT)
    assert failures == []
    assert len(seen) == 3  # the original, then both swapped in
    assert lst.store.reloads == 10


async def test_contexts_built_from_pinned_bytes(ca, certs, serve, tmp_path):
    """A worker builds its contexts from the bytes the supervisor read (config.FileCopies),
    never from a second read of the files."""
    import os

    from stickyproxy.config import FileCopies

    s = with_sni(certs)
    copies = FileCopies()
    for p in s.files():
        copies.read(p)
    for p in s.files():
        os.unlink(p)
    store = tls.CertStore(s, read_file=FileCopies(copies.files).read)
    lst = await serve(s, store)
    _, peer, (_, w) = await ask(lst.port, client_ctx(ca), "a.example.com")
    assert "a.example.com" in sans(peer)
    w.close()
    # a reload from disk now fails (the files are gone) and keeps the pinned contexts
    result = store.reload(read_file=lambda p: Path(p).read_bytes())
    assert not result.changed and result.errors[0].startswith("listen.tls.cert: cannot read")
