"""WebSocket through the proxy: the tunnel opens only after the backend answers 101
(DESIGN.md §3), is routed by the user key like any request, closes cleanly from either
side, and is closed when idle for ``timeouts.websocket_idle``."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
from aiohttp import WSMsgType, web

from support.http import http_request
from support.net import eventually


def ws_app(closed: list):
    async def handler(request: web.Request, rec):
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text=f"plain from {rec.backend}")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "server-close":
                    await ws.close(code=4000, message=b"bye")
                    break
                await ws.send_str(f"{rec.backend}:{msg.data}")
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        closed.append((rec.backend, ws.close_code))
        return ws

    return handler


async def ws_backends(backends, *ids):
    closed: list = []
    bs = await backends(*ids)
    for b in bs:
        b.handler = ws_app(closed)
    return bs, closed


async def test_websocket_echo_routed_by_user_key(backends, proxy):
    bs, closed = await ws_backends(backends, "a", "b", "c")
    p = await proxy(bs)
    users = [f"user-{i}" for i in range(12)]
    async with aiohttp.ClientSession() as s:
        for u in users:
            async with s.ws_connect(
                f"http://127.0.0.1:{p.port}/ws", headers={"X-User-Id": u}
            ) as ws:
                for i in range(3):
                    await ws.send_str(f"m{i}")
                    msg = await asyncio.wait_for(ws.receive(), 5)
                    assert msg.type == WSMsgType.TEXT
                    assert msg.data == f"{p.pref(u)[0]}:m{i}"
                blob = os.urandom(300_000)
                await ws.send_bytes(blob)
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.type == WSMsgType.BINARY and msg.data == blob
    for b in bs:
        for rec in b.requests:
            assert rec.one("X-Sticky-Backend") == b.id
            assert rec.one("Upgrade").lower() == "websocket"
            assert b.id == p.pref(rec.one("X-Sticky-Key"))[0]
    await eventually(lambda: len(closed) == len(users), what="every backend handler ended")


async def test_client_initiated_close_is_clean(backends, proxy):
    bs, closed = await ws_backends(backends, "a")
    p = await proxy(bs)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://127.0.0.1:{p.port}/ws", headers={"X-User-Id": "u"})
        await ws.send_str("hi")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "a:hi"
        await asyncio.wait_for(ws.close(code=1000), 5)
        assert ws.close_code == 1000  # the backend's close frame came back
    await eventually(lambda: closed == [("a", 1000)], what="backend saw the close")
    await eventually(lambda: not p.svc.proxy.clients, what="proxy released the tunnel")


async def test_server_initiated_close_is_clean(backends, proxy):
    bs, closed = await ws_backends(backends, "a")
    p = await proxy(bs)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://127.0.0.1:{p.port}/ws", headers={"X-User-Id": "u"})
        await ws.send_str("server-close")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == 4000 and msg.extra == "bye"
        await asyncio.wait_for(ws.close(), 5)
        assert ws.close_code == 4000
    await eventually(lambda: closed, what="backend handler ended")
    assert closed[0][0] == "a" and closed[0][1] in (1000, 4000)  # the client's reply code
    await eventually(lambda: not p.svc.proxy.clients, what="proxy released the tunnel")


async def test_idle_tunnel_is_closed_after_websocket_idle(backends, proxy):
    bs, closed = await ws_backends(backends, "a")
    p = await proxy(bs, {"timeouts": {"websocket_idle": "300ms"}})
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(
            f"http://127.0.0.1:{p.port}/ws",
            headers={"X-User-Id": "u"},
            autoping=False,
            heartbeat=None,
        )
        for i in range(2):  # activity keeps it open past the idle time
            await asyncio.sleep(0.2)
            await ws.send_str(f"k{i}")
            assert (await asyncio.wait_for(ws.receive(), 5)).data == f"a:k{i}"
        t0 = time.monotonic()
        msg = await asyncio.wait_for(ws.receive(), 5)
        took = time.monotonic() - t0
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
        assert 0.3 - 0.05 <= took <= 0.3 + 0.1 + 0.4, took
        await ws.close()
    await eventually(lambda: len(closed) == 1, what="the backend side was closed too")


async def test_upgrade_answered_without_101_keeps_the_connection_http(backends, proxy):
    bs, _ = await ws_backends(backends, "a")
    a = bs[0]

    async def refuse(request, rec):
        return web.Response(text="no websocket here")

    a.handler = refuse
    p = await proxy(bs)
    upgrade = http_request(
        "GET",
        "/ws",
        headers=[
            ("X-User-Id", "u"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    after = http_request("GET", "/after", headers={"X-User-Id": "u"})

    c = await p.client()  # the next request sent after the answer
    c.send(upgrade)
    r = await c.response()
    assert r.status == 200 and r.body == b"no websocket here"
    c.send(after)
    r2 = await c.response()
    assert r2.status == 200 and r2.body == b"no websocket here"
    c.close()

    c = await p.client()  # ... and pipelined right behind it
    c.send(upgrade + after)
    assert (await c.response()).status == 200
    assert (await c.response()).status == 200
    c.close()
    assert [rec.target for rec in a.requests] == ["/ws", "/after", "/ws", "/after"]


async def test_tunnel_bytes_sent_with_the_101_reach_the_client(raw_backend, proxy):
    async def script(conn):
        await conn.request()
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\nEARLY"
        )
        data = await conn.read_some()
        conn.send(b"ECHO:" + data)
        await conn.drain()

    be = await raw_backend("a", script)
    p = await proxy([be])
    c = await p.client()
    c.send(
        http_request(
            "GET",
            "/ws",
            headers=[("X-User-Id", "u"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
        )
    )
    r = await c.response()
    assert r.status == 101
    assert r.one("Upgrade").lower() == "websocket"
    await c._need(5, 5, "early tunnel bytes")
    assert bytes(c.buf) == b"EARLY"
    c.buf.clear()
    c.send(b"ping")
    await c._need(9, 5, "the echo through the tunnel")
    assert bytes(c.buf) == b"ECHO:ping"
    c.close()


async def _answer_101(conn):
    await conn.request()
    conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    await conn.drain()
    await conn.read_some()


async def test_unrequested_101_is_a_backend_error_not_a_tunnel(raw_backend, proxy):
    be = await raw_backend("a", _answer_101)
    p = await proxy([be])
    c = await p.client()
    c.send(http_request("POST", "/", headers={"X-User-Id": "u"}, body=b"x"))
    r = await c.response()
    assert r.status == 502
    c.close()
    await eventually(
        lambda: all(conn.eof for conn in be.connections),
        what="the upstream connection that sent the 101 was closed",
    )
