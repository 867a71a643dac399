"""Per-backend in-flight cap with a bounded wait queue (limits.max_inflight_per_backend,
limits.queue_per_backend, timeouts.queue): past the cap a request waits for a slot on its
own backend (stickiness is kept), past the queue it gets 503 with Retry-After."""

from __future__ import annotations

import asyncio
import time

from support.http import http_request
from support.net import eventually


def held_backend_script(release: asyncio.Event):
    async def script(conn):
        while (req := await conn.request(timeout=30)) is not None:
            if req.target.startswith("/hold"):
                await release.wait()
            conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                % (len(req.target), req.target.encode())
            )

    return script


async def test_requests_past_the_cap_wait_then_overflow_gets_503(raw_backend, proxy):
    release = asyncio.Event()
    be = await raw_backend("a", held_backend_script(release))
    p = await proxy(
        [be],
        {
            "limits": {"max_inflight_per_backend": 2, "queue_per_backend": 1},
            "timeouts": {"queue": "5s"},
        },
    )
    clients = []
    for i in range(3):  # 2 in flight + 1 waiting
        c = await p.client()
        c.send(http_request("GET", f"/hold{i}", headers={"X-User-Id": "u"}))
        clients.append(c)
    await eventually(lambda: len(be.requests) == 2, what="two requests in flight")
    await eventually(lambda: len(p.svc.proxy.upstreams["a"].waiters) == 1, what="one waiting")

    extra = await p.client()  # the queue is full: refused at once
    extra.send(http_request("GET", "/extra", headers={"X-User-Id": "u"}))
    r = await extra.response()
    assert r.status == 503
    assert r.one("Retry-After").isdigit()
    assert len(be.requests) == 2  # the waiting one has not been sent yet

    release.set()
    bodies = sorted([(await c.response()).body for c in clients])
    assert bodies == [b"/hold0", b"/hold1", b"/hold2"]
    for c in clients + [extra]:
        c.close()
    await eventually(lambda: p.svc.proxy.upstreams["a"].inflight == 0, what="slots given back")


async def test_a_request_waiting_longer_than_timeouts_queue_gets_503(raw_backend, proxy):
    release = asyncio.Event()
    be = await raw_backend("a", held_backend_script(release))
    p = await proxy(
        [be],
        {
            "limits": {"max_inflight_per_backend": 1, "queue_per_backend": 4},
            "timeouts": {"queue": "300ms"},
        },
    )
    holder = await p.client()
    holder.send(http_request("GET", "/hold", headers={"X-User-Id": "u"}))
    await eventually(lambda: be.requests, what="the slot is taken")
    waiter = await p.client()
    t0 = time.monotonic()
    waiter.send(http_request("GET", "/wait", headers={"X-User-Id": "u"}))
    r = await waiter.response(timeout=3)
    took = time.monotonic() - t0
    assert r.status == 503 and r.has("Retry-After")
    assert 0.3 <= took <= 0.3 + 0.1 + 0.4, took
    release.set()
    assert (await holder.response()).status == 200
    assert [rec.target for rec in be.requests] == ["/hold"]
    # the slot is free again
    assert (await p.get("/next", user="u")).status == 200


async def test_a_waiting_client_that_leaves_gives_up_its_place(raw_backend, proxy):
    release = asyncio.Event()
    be = await raw_backend("a", held_backend_script(release))
    p = await proxy(
        [be],
        {
            "limits": {"max_inflight_per_backend": 1, "queue_per_backend": 1},
            "timeouts": {"queue": "5s"},
        },
    )
    holder = await p.client()
    holder.send(http_request("GET", "/hold", headers={"X-User-Id": "u"}))
    await eventually(lambda: be.requests, what="the slot is taken")
    gone = await p.client()
    gone.send(http_request("GET", "/gone", headers={"X-User-Id": "u"}))
    await eventually(lambda: len(p.svc.proxy.upstreams["a"].waiters) == 1, what="waiting")
    gone.send_rst()
    await eventually(lambda: not p.svc.proxy.upstreams["a"].waiters, what="left the queue")
    nxt = await p.client()  # its queue place is free for another
    nxt.send(http_request("GET", "/next", headers={"X-User-Id": "u"}))
    await eventually(lambda: len(p.svc.proxy.upstreams["a"].waiters) == 1, what="queued")
    release.set()
    assert (await holder.response()).body == b"/hold"
    assert (await nxt.response()).body == b"/next"
    assert [rec.target for rec in be.requests] == ["/hold", "/next"]


async def test_requests_waiting_for_a_backend_that_refuses_connects_move_on_at_once(
    raw_backend, backends, proxy
):
    """Issue 15: when a connect to a backend is refused, the requests waiting for one of its
    slots go to their next backend at once, without each trying that backend in turn."""
    release = asyncio.Event()
    be = await raw_backend("a", held_backend_script(release))
    (other,) = await backends("b")
    p = await proxy(
        [be, other],
        {
            "limits": {"max_inflight_per_backend": 2, "queue_per_backend": 8},
            "timeouts": {"queue": "5s"},
            "passive": {"enabled": False},
            "admin": {"enabled": True, "port": 0},
        },
    )
    (user,) = [k for k in (f"user-{i}" for i in range(1000)) if p.pref(k)[0] == "a"][:1]
    holder = await p.client()
    holder.send(http_request("GET", "/hold", headers={"X-User-Id": user}))
    await eventually(lambda: be.requests, what="the first slot is taken")
    be.server.close()  # nothing listens any more; /hold stays open
    await be.server.wait_closed()
    clients = [await p.client() for _ in range(4)]
    for i, c in enumerate(clients):  # one takes the second slot, three wait
        c.send(http_request("GET", f"/w{i}", headers={"X-User-Id": user}))
    t0 = time.monotonic()
    for c in clients:
        r = await c.response(timeout=3)
        assert r.status == 200 and r.one("X-Backend") == "b", (r.status, r.body)
        c.close()
    assert time.monotonic() - t0 < 1.0  # not the 5 s queue timeout
    stats = p.svc.observer.stats.counters
    assert stats["upstream_errors"].get(("a", "connect"), 0) == 1, stats["upstream_errors"]
    assert stats["retries"].get(("a", "connect"), 0) == 4
    release.set()
    assert (await holder.response()).status == 200
