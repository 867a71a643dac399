"""An external scanner's view of the listener: `openssl s_client` (a TLS stack that is not
Python's) offers each protocol version, reports compression and secure renegotiation, and
tries a client-initiated renegotiation."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from stickyproxy import tls

from .conftest import Files

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

# s_client run time bound: a handshake on loopback takes milliseconds.
SCAN_TIMEOUT = 10.0


async def s_client(port: int, *args: str, stdin: bytes | None = None, pause: float = 0.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(SCAN_TIMEOUT):
            if stdin:
                for line in stdin.splitlines(keepends=True):
                    await asyncio.sleep(pause)
                    try:
                        proc.stdin.write(line)
                        await proc.stdin.drain()
                    except (ConnectionError, RuntimeError):
                        break  # s_client already gave up
                await asyncio.sleep(pause)
            proc.stdin.close()  # s_client ends its session at the end of its input
            out = await proc.stdout.read()
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


def listener_settings(certs: dict[str, Files]) -> tls.ListenTLS:
    return tls.ListenTLS(cert=certs["default"].cert, key=certs["default"].key)


@pytest.mark.parametrize("flag, version", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
async def test_scanner_sees_modern_versions_without_compression(certs, serve, flag, version):
    lst = await serve(listener_settings(certs))
    out = await s_client(lst.port, flag)
    m = re.search(r"^New, (\S+), Cipher is (\S+)", out, re.MULTILINE)
    assert m, out
    assert m.group(1) == version and m.group(2) != "(NONE)"
    assert "Compression: NONE" in out
    if version == "TLSv1.2":
        # RFC 5746 renegotiation_info is offered (no insecure legacy renegotiation) ...
        assert "Secure Renegotiation IS supported" in out


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
async def test_scanner_is_refused_old_versions(certs, serve, flag):
    lst = await serve(listener_settings(certs))
    # security level 0 lets this client offer TLS 1.0/1.1 at all: the refusal is the server's
    out = await s_client(lst.port, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert re.search(r"^New, \(NONE\), Cipher is \(NONE\)", out, re.MULTILINE), out
    written = re.search(r"handshake has read 0 bytes and written (\d+) bytes", out)
    assert written and int(written.group(1)) > 0, out  # a ClientHello was sent
    assert lst.store.gate.admitted == 1 and lst.store.gate.completed == 0


async def test_scanner_client_renegotiation_is_refused(certs, serve):
    # ... and a client-initiated renegotiation (s_client's "R" command) is refused
    # (OP_NO_RENEGOTIATION: each one would cost the server a full handshake).
    lst = await serve(listener_settings(certs))
    out = await s_client(lst.port, "-tls1_2", stdin=b"ping\nR\n", pause=0.3)
    assert "RENEGOTIATING" in out, out
    assert "no renegotiation" in out, out
