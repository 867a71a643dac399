"""Drain and undrain through the admin API, under load: no request fails, the drained
backend gets no new request once the drain call returned (in-flight ones finish), its users
go to their next backend and come back on undrain; its WebSocket tunnels are closed after
timeouts.drain; the drain survives a reload."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import WSMsgType, web

from support.config import keys_where
from support.health import user_requests
from support.net import eventually


def _slow_on(path: str, release: asyncio.Event, inner):
    async def handler(request: web.Request, rec):
        if request.path == path:
            await release.wait()
        return await inner(request, rec)

    return handler


async def test_drain_under_load_fails_nothing_and_moves_only_its_users(
    backends, ops_proxy, load_loops
):
    bs = await backends("a", "b", "c")
    a = bs[0]
    release = asyncio.Event()
    a.handler = _slow_on("/slow", release, a.handler)
    p = await ops_proxy(bs)
    users = [f"user-{i}" for i in range(60)]
    a_users = [u for u in users if p.pref(u)[0] == "a"]
    assert a_users

    # a request in flight on "a" when it is drained
    slow_user = a_users[0]
    slow = asyncio.create_task(p.get("/slow", user=slow_user, timeout=10))
    await eventually(lambda: any(r.target == "/slow" for r in a.requests), what="slow request at a")

    load = load_loops(p.port, users, total=600, concurrency=10).start()
    await load.reached(150)
    r = await p.admin("POST", "/backends/a/drain")
    assert r.status == 200 and r.json() == {"backend": "a", "drained": True}
    load.phase = "drained"
    view = (await p.backend_view())["a"]
    assert view["state"] == "drained" and view["drained"] is True and view["usable"] is False
    assert view["inflight"] >= 1  # the slow one is still being answered
    route = await p.route(slow_user)
    assert route["route"] == "failover" and route["chosen"] == p.pref(slow_user)[1]
    assert route["states"]["a"] == "drained"

    await load.reached(350)
    release.set()
    resp = await slow
    assert resp.status == 200 and resp.one("X-Backend") == "a"  # in flight: finished on a
    # requests sent after the drain returned and answered before the undrain is called
    drained_phase = {o.rid for o in load.in_phase("drained")}
    r = await p.admin("POST", "/backends/a/undrain")
    assert r.status == 200 and r.json() == {"backend": "a", "drained": False}
    load.phase = "undrained"
    await load.finish()

    assert not load.failures, load.describe_failures()
    # no request sent after the drain returned reached "a"
    at_a = [rec for rec in user_requests(a) if rec.target == "/load"]
    leaked = [rec.one("X-Req-Id") for rec in at_a if int(rec.one("X-Req-Id")) in drained_phase]
    assert not leaked, f"requests sent after the drain returned reached a: {leaked}"
    assert any(rec.one("X-Phase") == "undrained" for rec in at_a)  # used again after undrain
    for o in load.outcomes:
        owner = p.pref(o.user)[0]
        if o.rid in drained_phase:
            want = p.pref(o.user)[1] if owner == "a" else owner
            assert o.backend == want, (o.user, o.backend, want)
        elif o.phase == "undrained":
            assert o.backend == owner, (o.user, o.backend, owner)
    assert len(drained_phase) > 50 and len(load.in_phase("undrained")) > 50
    await eventually(
        lambda: all(up.inflight == 0 for up in p.svc.proxy.upstreams.values()),
        what="nothing in flight",
    )
    assert (await p.backend_view())["a"]["state"] == "up"


def _ws_handler(closed: list):
    async def handler(request: web.Request, rec):
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text=rec.backend, headers={"X-Backend": rec.backend})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(f"{rec.backend}:{msg.data}")
        closed.append(rec.backend)
        return ws

    return handler


async def test_drained_backends_websocket_tunnels_close_after_drain_timeout(backends, ops_proxy):
    bs = await backends("a", "b")
    closed: list[str] = []
    for b in bs:
        b.handler = _ws_handler(closed)
    p = await ops_proxy(bs, {"timeouts": {"drain": "400ms"}})
    ua = keys_where(p.pref, lambda pr: pr[0] == "a")[0]
    ub = keys_where(p.pref, lambda pr: pr[0] == "b")[0]
    url = f"http://127.0.0.1:{p.port}/ws"
    async with aiohttp.ClientSession() as s:
        wa = await s.ws_connect(url, headers={"X-User-Id": ua}, autoping=False, heartbeat=None)
        wb = await s.ws_connect(url, headers={"X-User-Id": ub}, autoping=False, heartbeat=None)
        m = await p.metrics()
        assert m.value("stickyproxy_websocket_tunnels", backend="a") == 1
        assert m.value("stickyproxy_websocket_tunnels", backend="b") == 1
        assert (await p.backend_view())["a"]["websocket_tunnels"] == 1

        asked_at = time.monotonic()
        r = await p.admin("POST", "/backends/a/drain")
        assert r.status == 200
        drained_at = time.monotonic()
        # the tunnel carries on until timeouts.drain...
        await wa.send_str("still")
        msg = await asyncio.wait_for(wa.receive(), 5)
        assert msg.type == WSMsgType.TEXT and msg.data == "a:still"
        # ...and is closed then
        msg = await asyncio.wait_for(wa.receive(), 5)
        now = time.monotonic()
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR), msg
        assert now - asked_at >= 0.4, now - asked_at  # not before timeouts.drain
        assert now - drained_at <= 0.4 + 1.0, now - drained_at  # and not much after
        await eventually(lambda: "a" in closed, what="the backend side of the tunnel closed")
        m = await p.metrics()
        assert m.value("stickyproxy_websocket_tunnels", backend="a") == 0
        # the other backend's tunnel is untouched
        await wb.send_str("hi")
        msg = await asyncio.wait_for(wb.receive(), 5)
        assert msg.type == WSMsgType.TEXT and msg.data == "b:hi"
        # a new WebSocket for a's user opens on its next backend
        wa2 = await s.ws_connect(url, headers={"X-User-Id": ua}, autoping=False, heartbeat=None)
        await wa2.send_str("again")
        msg = await asyncio.wait_for(wa2.receive(), 5)
        assert msg.data == f"{p.pref(ua)[1]}:again"
        await wa.close()
        await wa2.close()
        await wb.close()


async def test_drain_survives_a_reload(backends, ops_proxy):
    bs = await backends("a", "b", "c")
    p = await ops_proxy(bs)
    users = keys_where(p.pref, lambda pr: pr[0] == "a", n=5)
    assert (await p.admin("POST", "/backends/a/drain")).status == 200
    bs[1].weight = 2  # reweight b: a new ring
    p.rewrite(bs)
    old_fp = p.fingerprint
    r = await p.admin("POST", "/reload")
    assert r.status == 200, r.text
    assert r.json()["ring"] != old_fp
    view = await p.backend_view()
    assert view["a"]["drained"] is True and view["a"]["state"] == "drained"
    before = len(user_requests(bs[0]))
    for u in users:
        resp = await p.get("/x", user=u)
        assert resp.status == 200
        if p.pref(u)[0] == "a":  # still owned by a on the new ring
            assert resp.one("X-Backend") == p.pref(u)[1]
    assert len(user_requests(bs[0])) == before
    # also across Service.reload() (what SIGHUP runs) with an unchanged file
    ok, errors = await p.svc.reload("test")
    assert ok and not errors
    assert (await p.backend_view())["a"]["drained"] is True
    assert (await p.admin("POST", "/backends/a/undrain")).status == 200
    u = keys_where(p.pref, lambda pr: pr[0] == "a")[0]
    assert (await p.get("/x", user=u)).one("X-Backend") == "a"
