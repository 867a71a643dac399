"""Large bodies stream through with bounded memory: explicit backpressure in both directions
(DESIGN.md §3: "relayed between protocol objects with explicit backpressure")."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from aiohttp import web

from support.http import http_request
from support.net import eventually

MB = 1 << 20
CHUNK = b"0123456789abcdef" * 4096  # 64 KiB


def sized_download(request_target: str) -> int:
    return int(request_target.rsplit("/", 1)[1])


async def streaming_handler(request: web.Request, rec):
    """GET /down/N: N bytes streamed; PUT/POST: the body is consumed (slowly at first) and
    answered with its length and sha256."""
    if request.method == "GET":
        if not rec.target.startswith("/down/"):
            return web.Response(text="ready")
        n = sized_download(rec.target)
        resp = web.StreamResponse(headers={"Content-Length": str(n)})
        await resp.prepare(request)
        sent = 0
        while sent < n:
            piece = CHUNK[: min(len(CHUNK), n - sent)]
            await resp.write(piece)
            sent += len(piece)
        return resp
    await asyncio.sleep(float(request.headers.get("X-Stall", "0")))
    h = hashlib.sha256()
    total = 0
    async for piece in request.content.iter_chunked(1 << 16):
        h.update(piece)
        total += len(piece)
    return web.Response(text=f"{total} {h.hexdigest()}")


def expected_digest(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(CHUNK))
    for _ in range(full):
        h.update(CHUNK)
    h.update(CHUNK[:rest])
    return h.hexdigest()


async def stream_backend(backends, bid="a"):
    (a,) = await backends(bid)
    a.handler = streaming_handler
    a.read_body = False
    return a


async def read_body_hash(reader: asyncio.StreamReader, n: int) -> str:
    h = hashlib.sha256()
    got = 0
    while got < n:
        async with asyncio.timeout(10):
            data = await reader.read(1 << 18)
        assert data, f"connection ended after {got} of {n} body bytes"
        h.update(data)
        got += len(data)
    assert got == n
    return h.hexdigest()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.readuntil(b"\r\n\r\n")


async def test_download_to_a_client_that_does_not_read_is_not_buffered(backends, proxy):
    a = await stream_backend(backends)
    p = await proxy([a])
    n = 48 * MB
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(http_request("GET", f"/down/{n}", headers={"X-User-Id": "u"}))
    await eventually(lambda: p.svc.proxy.clients, what="connection accepted")
    (cp,) = p.svc.proxy.clients
    peak = 0
    for _ in range(40):  # 0.4 s of not reading at all
        await asyncio.sleep(0.01)
        peak = max(peak, cp.transport.get_write_buffer_size())
    assert peak < 2 * MB, f"the proxy buffered {peak} bytes for a client that reads nothing"
    head = await read_head(reader)
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    assert await read_body_hash(reader, n) == expected_digest(n)
    writer.close()


async def test_upload_to_a_backend_that_does_not_read_is_not_buffered(backends, proxy):
    a = await stream_backend(backends)
    p = await proxy([a])
    n = 32 * MB
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(
        http_request(
            "PUT", "/up", headers={"X-User-Id": "u", "X-Stall": "0.5", "Content-Length": str(n)}
        )
    )
    peak = 0

    async def sample():
        nonlocal peak
        while True:
            for cp in list(p.svc.proxy.clients):
                ex = cp.queue[0] if cp.queue else None
                up = ex.upstream if ex is not None else None
                if up is not None and up.transport is not None:
                    peak = max(peak, up.transport.get_write_buffer_size())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    sent = 0
    try:
        while sent < n:
            writer.write(CHUNK)
            sent += len(CHUNK)
            async with asyncio.timeout(10):
                await writer.drain()
        head = await read_head(reader)
        assert b" 200 " in head.split(b"\r\n", 1)[0]
        body = await asyncio.wait_for(reader.read(200), 10)
    finally:
        sampler.cancel()
    assert body.decode() == f"{n} {expected_digest(n)}"
    assert peak < 2 * MB, f"the proxy buffered {peak} bytes for a backend that reads nothing"
    writer.close()


@pytest.mark.slow
async def test_50mb_upload_and_download_keep_proxy_memory_bounded(backends, proxy_process):
    a = await stream_backend(backends)
    pp = proxy_process([a])
    await pp.wait_ready()
    before = pp.status_field("VmHWM")
    n = 50 * MB

    # download: the client does not read for a while (the proxy must stop reading upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", pp.port)
    writer.write(http_request("GET", f"/down/{n}", headers={"X-User-Id": "u"}))
    await asyncio.sleep(1.0)  # a deliberately stalled reader, not a sync
    head = await read_head(reader)
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    assert await read_body_hash(reader, n) == expected_digest(n)
    writer.close()

    # upload: the backend does not read for a while (the proxy must stop reading the client)
    reader, writer = await asyncio.open_connection("127.0.0.1", pp.port)
    writer.write(
        http_request(
            "PUT", "/up", headers={"X-User-Id": "u", "X-Stall": "1.0", "Content-Length": str(n)}
        )
    )
    sent = 0
    while sent < n:
        writer.write(CHUNK)
        sent += len(CHUNK)
        async with asyncio.timeout(20):
            await writer.drain()
    await read_head(reader)
    body = await asyncio.wait_for(reader.read(200), 20)
    assert body.decode() == f"{n} {expected_digest(n)}"
    writer.close()

    growth_kb = pp.status_field("VmHWM") - before
    assert growth_kb < 20 * 1024, f"proxy peak RSS grew by {growth_kb} kB moving 2 x 50 MB"
