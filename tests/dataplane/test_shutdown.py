"""Graceful shutdown: in-flight requests finish, new connections are refused, idle ones are
closed; the same through SIGTERM on a real ``stickyproxy run`` process, with one worker and
with ``--workers 2`` (no process left behind)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from aiohttp import web

from support.http import Client, http_request
from support.net import eventually
from support.procs import alive, descendants


def slow_handler(delay: float):
    async def handler(request, rec):
        if rec.target.startswith("/slow"):
            await asyncio.sleep(delay)
            return web.Response(body=b"slow done " + b"s" * 10000)
        return web.Response(text=f"fast {rec.backend}")

    return handler


async def _refused(port: int) -> bool:
    try:
        c = await Client.connect(port, timeout=1)
    except ConnectionRefusedError:
        return True
    c.close()
    return False


async def test_service_stop_finishes_in_flight_and_refuses_new_connections(backends, proxy):
    (a,) = await backends("a")
    a.handler = slow_handler(0.5)
    p = await proxy([a], {"timeouts": {"shutdown": "5s"}})
    port = p.port
    busy = await p.client()
    busy.send(http_request("GET", "/slow", headers={"X-User-Id": "u"}))
    idle = await p.client()
    idle.send(http_request("GET", "/fast", headers={"X-User-Id": "u"}))
    assert (await idle.response()).status == 200
    await eventually(lambda: any(r.target == "/slow" for r in a.requests), what="slow request sent")

    stopping = asyncio.create_task(p.svc.stop())
    await eventually(lambda: _refused(port), deadline=2, what="listener closed")
    assert await idle.closed(timeout=1)  # an idle keep-alive connection is let go
    assert not stopping.done()  # ... while the slow one is still running
    r = await busy.response(timeout=5)
    assert r.status == 200
    assert r.body == b"slow done " + b"s" * 10000
    assert r.wants_close
    assert await busy.closed()
    await asyncio.wait_for(stopping, 5)


async def test_service_stop_gives_up_after_the_shutdown_grace(backends, proxy):
    (a,) = await backends("a")
    a.handler = slow_handler(30)
    p = await proxy([a], {"timeouts": {"shutdown": "300ms"}})
    c = await p.client()
    c.send(http_request("GET", "/slow", headers={"X-User-Id": "u"}))
    await eventually(lambda: a.requests, what="request sent")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(p.svc.stop(), 5)
    assert loop.time() - t0 < 0.3 + 1.5
    assert await c.closed()  # cut, not answered after the grace


@pytest.mark.slow
async def test_sigterm_mid_request_answers_it_and_exits_zero(backends, proxy_process):
    (a,) = await backends("a")
    a.handler = slow_handler(1.0)
    pp = proxy_process([a], {"timeouts": {"shutdown": "10s"}, "logging": {"level": "info"}})
    await pp.wait_ready()
    c = await Client.connect(pp.port)
    c.send(http_request("GET", "/slow", headers={"X-User-Id": "u"}))
    await eventually(lambda: any(r.target == "/slow" for r in a.requests), what="request sent")
    pp.signal(signal.SIGTERM)
    r = await c.response(timeout=5)
    assert r.status == 200 and r.body.startswith(b"slow done")
    assert await pp.wait_exit() == 0, pp.output()
    assert await _refused(pp.port)
    assert "Traceback" not in pp.output()
    assert "stopped: every in-flight request finished" in pp.output()


@pytest.mark.slow
async def test_two_workers_serve_and_sigterm_leaves_no_process_behind(backends, proxy_process):
    bs = await backends("a", "b")
    pp = proxy_process(bs, {"admin": {"enabled": False}}, workers=2)
    await pp.wait_ready()

    async def workers_up():
        return len([q for q in descendants(pp.pid) if alive(q)]) >= 2

    await eventually(workers_up, deadline=15, interval=0.05, what="two worker processes")
    children = descendants(pp.pid)

    for i in range(40):  # fresh connections spread over both
        c = await Client.connect(pp.port)
        c.send(http_request("GET", f"/{i}", headers={"X-User-Id": f"user-{i}"}))
        r = await c.response()
        assert r.status == 200
        c.close()
    assert sum(len(b.requests) for b in bs) >= 40

    pp.signal(signal.SIGTERM)
    assert await pp.wait_exit(timeout=20) == 0, pp.output()
    await eventually(
        lambda: not any(alive(q) for q in children), deadline=5, what="every worker exited"
    )
    assert await _refused(pp.port)
    assert "Traceback" not in pp.output()
