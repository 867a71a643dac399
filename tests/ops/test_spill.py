"""Opt-in bounded load (``routing.balance_factor``) on real sockets: with the owner of a key
holding far more than its share of the requests in flight, a new request of that key spills
to the next backend on its preference list, counted and logged as a spill; with the factor
off (the default) it stays on its owner whatever the load."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from support.config import keys_where
from support.net import eventually

# requests held in flight on the owner: far above 1.25 x the mean of three backends
HELD = 6


def holding(backend, release: asyncio.Event):
    """``backend`` answers /hold only once ``release`` is set; everything else at once."""
    inner = backend.handler

    async def handler(request: web.Request, rec) -> web.StreamResponse:
        if request.path == "/hold":
            await release.wait()
        return await inner(request, rec)

    backend.handler = handler


def held_on(backend) -> int:
    return sum(1 for r in backend.requests if r.target == "/hold")


async def test_a_hot_user_held_in_flight_spills_along_its_preference_list(
    backends, ops_proxy, attach_log
):
    bs = await backends("a", "b", "c")
    release = asyncio.Event()
    for b in bs:
        holding(b, release)
    log = attach_log("stickyproxy.access")
    p = await ops_proxy(bs, {"routing": {"balance_factor": 1.25}, "logging": {"access": "json"}})
    user = keys_where(p.pref, lambda pr: pr[0] == "a")[0]
    first, second, third = p.pref(user)
    by_id = {b.id: b for b in bs}
    held = []
    try:
        # One at a time, so each is routed with the previous ones in flight. With three
        # backends of weight 1 and 125 %, n requests in flight leave room for
        # ceil(1.25 * (n + 1) / 3) on each: the owner takes the 1st, 3rd and 5th, its next
        # backend the 2nd, 4th and 6th (HAProxy's and Envoy's rule, routing/spill.py).
        for n in range(1, HELD + 1):
            held.append(asyncio.create_task(p.get("/hold", user=user, timeout=20)))
            await eventually(lambda n=n: sum(map(held_on, bs)) == n, what=f"{n} held")
        assert held_on(by_id[first]) == 3 and held_on(by_id[second]) == 3
        assert p.svc.proxy.inflight() == {first: 3, second: 3, third: 0}
        # both full at 6 in flight (capacity 3 each): the next goes to the third
        r = await p.get("/who", user=user)
        assert r.status == 200 and r.one("X-Backend") == third
        rec = [q for q in by_id[third].requests if q.target == "/who"][-1]
        assert rec.one("X-Sticky-Route") == "failover"  # not the owner (DESIGN.md §4)
    finally:
        release.set()
        done = await asyncio.gather(*held)
    assert all(h.status == 200 for h in done)

    # the access log names each request's route: 4 spills, 3 on the owner
    routes = [(rec["route"], rec["backend"]) for rec in map(json.loads, log.messages())]
    assert sorted(routes) == sorted(
        [("primary", first)] * 3 + [("spill", second)] * 3 + [("spill", third)]
    )
    m = await p.metrics()
    assert m.value("stickyproxy_spills_total", backend=first) == 4
    assert m.value("stickyproxy_route_decisions_total", result="spill") == 4
    assert m.value("stickyproxy_route_decisions_total", result="primary") == 3
    # the load gone, the user is back on its owner
    assert (await p.get("/who", user=user)).one("X-Backend") == first


async def test_without_balance_factor_a_hot_user_stays_on_its_owner(backends, ops_proxy):
    bs = await backends("a", "b", "c")
    release = asyncio.Event()
    for b in bs:
        holding(b, release)
    p = await ops_proxy(bs)
    user = keys_where(p.pref, lambda pr: pr[0] == "a")[0]
    held = [asyncio.create_task(p.get("/hold", user=user, timeout=20)) for _ in range(HELD)]
    try:
        await eventually(lambda: held_on(bs[0]) == HELD, what="all held on a")
        assert p.svc.proxy.inflight() == {"a": HELD, "b": 0, "c": 0}
        assert (await p.get("/who", user=user)).one("X-Backend") == "a"
    finally:
        release.set()
        await asyncio.gather(*held)
    m = await p.metrics()
    assert m.value("stickyproxy_spills_total", backend="a") == 0
    assert m.value("stickyproxy_route_decisions_total", result="spill") == 0
