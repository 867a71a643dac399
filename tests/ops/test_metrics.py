"""/metrics after known traffic: exact counter values for requests, route decisions,
retries and upstream errors; latency histogram counts; gauges at rest and while a
connection or a WebSocket tunnel is open."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from aiohttp import WSMsgType, web

from support.backends import DeadBackend, echo_handler
from support.config import keys_where
from support.http import Client, http_request
from support.net import eventually


async def _with_404(request: web.Request, rec):
    if request.path == "/missing":
        return web.Response(status=404, text="no such thing", headers={"X-Backend": rec.backend})
    if request.headers.get("Upgrade", "").lower() == "websocket":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws
    return await echo_handler(request, rec)


async def test_metrics_after_known_traffic(backends, ops_proxy, raw_backend):
    async def reset_after_request(conn):
        while await conn.request() is not None:
            conn.abort()
            return

    a, b = await backends("a", "b")
    a.handler = b.handler = _with_404
    d1, d2 = DeadBackend("d1"), DeadBackend("d2")
    r = await raw_backend("r", reset_after_request)
    p = await ops_proxy(
        [a, b, d1, d2, r],
        {"passive": {"enabled": False, "connect_down": "0s"}, "retries": {"attempts": 1}},
    )
    live = ("a", "b")
    ok_a = keys_where(p.pref, lambda pr: pr[0] == "a", n=6, prefix="ok-a")
    ok_b = keys_where(p.pref, lambda pr: pr[0] == "b", n=4, prefix="ok-b")
    missing = keys_where(p.pref, lambda pr: pr[0] == "a", n=3, prefix="nf")
    fail_over = keys_where(p.pref, lambda pr: pr[0] == "d1" and pr[1] in live, n=2, prefix="fo")
    (dead_end,) = keys_where(p.pref, lambda pr: pr[:2] == ["d1", "d2"], prefix="de")
    (r_post,) = keys_where(p.pref, lambda pr: pr[0] == "r", prefix="rp")
    (r_get,) = keys_where(p.pref, lambda pr: pr[0] == "r" and pr[1] in live, prefix="rg")

    expect_requests: Counter = Counter()
    for u in ok_a + ok_b:
        resp = await p.get("/x", user=u)
        assert resp.status == 200
        expect_requests[(p.pref(u)[0], "2xx")] += 1
    for u in missing:
        resp = await p.get("/missing", user=u)
        assert resp.status == 404  # the backend's 404, passed through
        expect_requests[("a", "4xx")] += 1
    for u in fail_over:  # refused connect, retried: 200
        resp = await p.get("/x", user=u)
        assert resp.status == 200 and resp.one("X-Backend") == p.pref(u)[1]
        expect_requests[(p.pref(u)[1], "2xx")] += 1
    resp = await p.get("/x", user=dead_end)  # d1 refused, retried on d2: refused
    assert resp.status == 502, (resp.status, resp.body)
    expect_requests[("d2", "5xx")] += 1
    resp = await p.get("/x", user=r_post, method="POST", body=b"payload")
    assert resp.status == 502  # reset after a POST: not retried
    expect_requests[("r", "5xx")] += 1
    resp = await p.get("/x", user=r_get)  # reset after a GET: retried
    assert resp.status == 200 and resp.one("X-Backend") == p.pref(r_get)[1]
    expect_requests[(p.pref(r_get)[1], "2xx")] += 1
    c = await Client.connect(p.port)  # malformed: the proxy answers 400
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-User-Id: u\r\n\r\n")
    assert (await c.response()).status == 400
    c.close()
    expect_requests[("none", "4xx")] += 1
    sent = sum(expect_requests.values())

    await eventually(lambda: p.svc.observer.clients == 0, what="client connections closed")
    m = await p.metrics()
    got = {
        (dict(ls)["backend"], dict(ls)["code_class"]): v
        for ls, v in m.series("stickyproxy_requests_total").items()
    }
    assert got == dict(expect_requests), (got, dict(expect_requests))
    assert m.total("stickyproxy_requests_total") == sent == 19
    for bid in ("a", "b", "d2", "r"):
        n = sum(v for (be, _), v in expect_requests.items() if be == bid)
        assert m.value("stickyproxy_request_duration_seconds_count", backend=bid) == n, bid
        assert m.value("stickyproxy_request_duration_seconds_bucket", backend=bid, le="+Inf") == n
        assert m.value("stickyproxy_request_duration_seconds_sum", backend=bid) > 0
    assert (
        m.value("stickyproxy_request_duration_seconds_count", backend="none", default=None) is None
    )  # nothing was forwarded for the 400
    assert m.by("stickyproxy_route_decisions_total", "result") == {
        "primary": 6 + 4 + 3 + 1,  # ok, 404s, the POST to r
        "failover": 2 + 1 + 1,
    }  # retried ones count as failover
    assert m.series("stickyproxy_retries_total") == {
        frozenset({("backend", "d1"), ("reason", "connect")}): 3,
        frozenset({("backend", "r"), ("reason", "reset")}): 1,
    }
    assert m.series("stickyproxy_upstream_errors_total") == {
        frozenset({("backend", "d1"), ("kind", "connect")}): 3,
        frozenset({("backend", "d2"), ("kind", "connect")}): 1,
        frozenset({("backend", "r"), ("kind", "reset")}): 2,
    }
    assert m.by("stickyproxy_rejected_requests_total", "status") == {"400": 1}
    ids = ("a", "b", "d1", "d2", "r")
    assert m.by("stickyproxy_backend_up", "backend") == {bid: 1 for bid in ids}
    assert m.by("stickyproxy_backend_inflight", "backend") == {bid: 0 for bid in ids}
    shares = m.by("stickyproxy_backend_key_share", "backend")
    assert set(shares) == set(ids) and abs(sum(shares.values()) - 1) < 1e-9
    ring = (await p.admin("GET", "/ring")).json()
    assert {mm["id"]: round(shares[mm["id"]], 6) for mm in ring["members"]} == {
        mm["id"]: mm["key_share"] for mm in ring["members"]
    }
    assert m.value("stickyproxy_client_connections") == 0
    assert sum(m.by("stickyproxy_websocket_tunnels", "backend").values()) == 0
    assert m.value("stickyproxy_ejections_total", backend="d1", default=0) == 0
    assert m.value("stickyproxy_reloads_total", result="success", default=0) == 0

    # gauges while things are open
    c = await Client.connect(p.port)
    c.send(http_request("GET", "/x", headers={"X-User-Id": ok_a[0]}))
    assert (await c.response()).status == 200  # kept alive
    m = await p.metrics()
    assert m.value("stickyproxy_client_connections") == 1
    c.close()
    await eventually(lambda: p.svc.observer.clients == 0, what="connection closed")
    assert (await p.metrics()).value("stickyproxy_client_connections") == 0

    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://127.0.0.1:{p.port}/ws", headers={"X-User-Id": ok_b[0]})
        await ws.send_str("ping")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "ping"
        m = await p.metrics()
        assert m.value("stickyproxy_websocket_tunnels", backend="b") == 1
        assert m.value("stickyproxy_client_connections") == 1
        assert m.value("stickyproxy_requests_total", backend="b", code_class="1xx") == 1
        assert (
            m.value("stickyproxy_backend_inflight", backend="b") == 0
        )  # a tunnel is not a request
        await ws.close()
    await eventually(lambda: p.svc.observer.clients == 0, what="tunnel closed")
    m = await p.metrics()
    assert m.value("stickyproxy_websocket_tunnels", backend="b") == 0
    assert m.value("stickyproxy_client_connections") == 0


async def test_inflight_gauge_counts_requests_being_answered(backends, ops_proxy):
    (a,) = await backends("a")
    release = asyncio.Event()

    async def slow(request, rec):
        await release.wait()
        return await echo_handler(request, rec)

    a.handler = slow
    p = await ops_proxy([a])
    tasks = [asyncio.create_task(p.get("/slow", user=f"u{i}", timeout=10)) for i in range(3)]
    await eventually(lambda: len(a.requests) == 3, what="three requests at a")
    m = await p.metrics()
    assert m.value("stickyproxy_backend_inflight", backend="a") == 3
    assert (await p.backend_view())["a"]["inflight"] == 3
    assert m.value("stickyproxy_client_connections") == 3
    release.set()
    assert [r.status for r in await asyncio.gather(*tasks)] == [200, 200, 200]
    m = await p.metrics()
    assert m.value("stickyproxy_backend_inflight", backend="a") == 0
    assert m.value("stickyproxy_requests_total", backend="a", code_class="2xx") == 3
