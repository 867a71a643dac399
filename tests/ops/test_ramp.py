"""Gradual failback on real sockets: a recovered backend gets its users back slice by slice
as its ramp progresses (each user exactly when its fixed point is passed, and never bounced
back), and two proxies that share nothing but the ramp's start agree on every key's side of
it at the same instant."""

from __future__ import annotations

import json
import time

import pytest

from stickyproxy.control.health import Health
from stickyproxy.routing.ramp import POINT_SPACE, key_point
from support.config import keys_where
from support.health import HealthScript, health_cfg, with_health
from support.net import eventually

RAMP = 1.5  # seconds: long enough for several rounds of requests
USERS = 60  # users owned by the recovering backend
# a request's routing instant is known to within this (it is taken between two clock reads)
EDGE = 0.02
# checks a loaded machine does not fail spuriously (a flap of every backend restarts ramps)
STEADY = {"interval": "100ms", "timeout": "100ms"}


async def _down_then_up(p, hs: HealthScript, bid: str = "a") -> None:
    hs.script(hold=500)
    await eventually(lambda: not p.svc.table.states[bid].healthy, what=f"{bid} down")
    hs.script(hold=200)
    await eventually(lambda: p.svc.table.states[bid].healthy, what=f"{bid} up")


@pytest.mark.slow
async def test_a_recovered_backend_gets_its_users_back_gradually(backends, ops_proxy):
    bs = await backends("a", "b", "c")
    hs = with_health(bs[0], HealthScript(hold=200))
    p = await ops_proxy(
        bs, {"health": health_cfg(rise=1, fall=2, **STEADY, failback_ramp=f"{int(RAMP * 1000)}ms")}
    )
    users = keys_where(p.pref, lambda pr: pr[0] == "a", n=USERS)
    await _down_then_up(p, hs)
    ramp = p.svc.table.states["a"].ramp
    assert ramp is not None and ramp.duration == RAMP
    returns = {u: ramp.return_time(key_point(u)) for u in users}

    rounds: list[tuple[float, int]] = []  # (progress at the round's start, users on a)
    first_on_a: dict[str, float] = {}
    while time.monotonic() < ramp.end + 0.1:
        start = time.monotonic()
        on_a = 0
        for u in users:
            before = time.monotonic()
            r = await p.get("/x", user=u)
            after = time.monotonic()
            got = r.one("X-Backend")
            if got == "a":
                on_a += 1
                first_on_a.setdefault(u, before)
            elif u in first_on_a:
                raise AssertionError(f"{u} went back to its fallback after returning")
            # each user exactly when the ramp passes its point (the routing instant lies
            # between ``before`` and ``after``)
            if returns[u] < before - EDGE:
                assert got == "a", (u, returns[u] - before)
            elif returns[u] > after + EDGE:
                assert got == p.pref(u)[1], (u, returns[u] - after)
        rounds.append((ramp.progress(start), on_a))
    assert len(rounds) >= 3, rounds
    # slice by slice: few back at first, all back at the end, never fewer than before
    counts = [n for _, n in rounds]
    assert counts == sorted(counts), rounds
    assert counts[0] <= USERS // 2 and counts[-1] == USERS, rounds
    m = await p.metrics()
    assert m.value("stickyproxy_backend_ramp_progress", backend="a") == 1.0


async def test_two_proxies_agree_on_every_keys_side_of_the_ramp(backends, ops_proxy):
    bs = await backends("a", "b", "c")
    hs = with_health(bs[0], HealthScript(hold=200))
    cfg = {"health": health_cfg(rise=1, fall=2, failback_ramp="60s", **STEADY)}
    p1 = await ops_proxy(bs, cfg, name="p1.toml")
    p2 = await ops_proxy(bs, cfg, name="p2.toml")
    hs.script(hold=500)
    await eventually(
        lambda: not p1.svc.table.states["a"].healthy and not p2.svc.table.states["a"].healthy,
        what="a down in both",
    )
    hs.script(hold=200)
    await eventually(
        lambda: p1.svc.table.states["a"].healthy and p2.svc.table.states["a"].healthy,
        what="a up in both",
    )
    a1, a2 = p1.svc.table.states["a"], p2.svc.table.states["a"]
    # each started its own ramp when its own check saw a back: within a check or two
    assert abs(a1.ramp.start - a2.ramp.start) < 0.3
    # the second takes the first's ramp as a worker takes its supervisor's (a JSON message
    # with times relative to it)
    message = json.loads(json.dumps(Health.ramp_state(a1, time.monotonic())))
    p2.svc.health.follow_ramp(a2, message)
    assert abs(a1.ramp.start - a2.ramp.start) < 0.01

    # key by key at one instant, a few seconds into the ramp (some keys back, most not)
    owned = keys_where(p1.pref, lambda pr: pr[0] == "a", n=3000)
    now = a1.ramp.start + 3.0
    r1, r2 = p1.svc.table.router, p2.svc.table.router
    sides = [(r1.route(k, now).backend.id, r2.route(k, now).backend.id) for k in owned]
    assert all(x == y for x, y in sides)
    back = sum(x == "a" for x, _ in sides)
    assert 0.02 < back / len(owned) < 0.08, back  # 3 s of 60 s: about 5 %

    # and through the data plane: the same backend from both for keys clear of the edge
    now = time.monotonic()
    clear = [k for k in owned[:200] if abs(a1.ramp.return_time(key_point(k)) - now) > 1.0][:100]
    for k in clear:
        x = (await p1.get("/x", user=k)).one("X-Backend")
        y = (await p2.get("/x", user=k)).one("X-Backend")
        assert x == y, k
        assert (x == "a") is (key_point(k) / POINT_SPACE < a1.ramp.progress(now))
    view = await p1.route(owned[0])
    assert view["states"]["a"] == "ramping" and "a" in view["ramps"]


async def test_a_backend_added_by_a_reload_starts_slowly(backends, ops_proxy):
    a, b, c = await backends("a", "b", "c")
    p = await ops_proxy([a, b], {"health": {"failback_ramp": "60s"}})
    users = [f"user-{i}" for i in range(400)]
    before = {u: (await p.get("/x", user=u)).one("X-Backend") for u in users[:100]}
    p.rewrite([a, b, c])
    r = await p.admin("POST", "/reload")
    assert r.status == 200, r.text
    view = (await p.backend_view())["c"]
    assert view["state"] == "ramping" and view["ramp"]["duration"] == 60.0
    assert view["reason"] == "added: slow start"
    ramp = p.svc.table.states["c"].ramp
    moved = [u for u in users if p.pref(u)[0] == "c"]
    assert moved
    now = time.monotonic()
    for u in moved[:40]:
        got = (await p.get("/x", user=u)).one("X-Backend")
        if ramp.return_time(key_point(u)) > now + 1.0:
            # not returned: where it was before c existed (its next choice on the new ring)
            assert got == p.pref(u)[1]
            if u in before:
                assert got == before[u]
    # the users of a and b do not move at all
    for u, was in before.items():
        if p.pref(u)[0] != "c":
            assert (await p.get("/x", user=u)).one("X-Backend") == was
    m = await p.metrics()
    assert 0.0 <= m.value("stickyproxy_backend_ramp_progress", backend="c") < 0.1
    assert m.value("stickyproxy_backend_ramp_progress", backend="a") == 1.0
