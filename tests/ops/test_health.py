"""Active health (rise/fall), damped failback and panic mode, observed the way an operator
sees them: GET /backends, GET /route, /metrics, the health log, and where users land."""

from __future__ import annotations

import logging
import time

import pytest

from support.config import keys_where
from support.health import (
    HealthScript,
    health_cfg,
    simulate_rise_fall,
    user_requests,
    with_health,
)
from support.net import eventually


async def _landed(p, user: str) -> str:
    r = await p.get("/who", user=user)
    assert r.status == 200, (r.status, r.body)
    return r.one("X-Backend")


@pytest.mark.slow
async def test_health_flaps_follow_rise_and_fall(backends, ops_proxy, attach_log, caplog):
    bs = await backends("a", "b", "c")
    a = bs[0]
    hs = with_health(a, HealthScript(hold=200))
    caplog.set_level(logging.INFO, logger="stickyproxy.control.health")
    # every state change is logged with the number of checks "a" had answered at that moment
    # (checks of one backend are sequential, so that number is the check that decided it)
    seen = attach_log("stickyproxy.control.health", probe=lambda: hs.count)
    # 100 ms apart with a 100 ms timeout: a loaded machine's event-loop stalls must not turn
    # a check the backend answered into a timeout, or the exact counts below would be off
    p = await ops_proxy(
        bs, {"health": health_cfg(rise=2, fall=3, interval="100ms", timeout="100ms")}
    )
    users = keys_where(p.pref, lambda pr: pr[0] == "a", n=4)

    def changes():
        return [
            (n, "down" if "DOWN" in r.getMessage() else "up")
            for r, n in seen.records
            if "backend a is" in r.getMessage()
        ]

    # 1. flaps shorter than `fall` never take it down
    hs.script(500, 503, 200, 404, 500, 200, 500, 500, hold=200)
    mark = hs.count
    await eventually(lambda: hs.count >= mark + 9, what="the scripted checks were served")
    assert changes() == []
    assert (await p.backend_view())["a"]["state"] == "up"

    # 2. three failures in a row do
    hs.script(hold=500)
    await eventually(lambda: changes(), what="a marked down")
    view = (await p.backend_view())["a"]
    assert view["state"] == "down" and view["healthy"] is False and view["usable"] is False
    assert view["reason"] == "3 consecutive failed checks (status 500)", view["reason"]
    # its users fail over to the next backend on their preference list
    for u in users:
        assert await _landed(p, u) == p.pref(u)[1]
    route = await p.route(users[0])
    assert route["route"] == "failover" and route["chosen"] == p.pref(users[0])[1]
    assert route["states"]["a"] == "down"

    # 3. one success between failures is not enough to come back; two in a row are
    hs.script(200, 500, 200, 503, 200, hold=200)
    await eventually(lambda: len(changes()) == 2, what="a marked up again")
    view = (await p.backend_view())["a"]
    assert view["state"] == "up" and view["usable"] is True
    assert view["reason"] == "2 consecutive successful checks (status 200)", view["reason"]
    before = len(user_requests(a))
    for u in users:
        assert await _landed(p, u) == "a"
    assert len(user_requests(a)) == before + len(users)

    # the exact checks at which it flipped are the ones rise/fall predict
    mark = hs.count
    await eventually(lambda: hs.count >= mark + 2, what="a few steady checks")
    assert changes() == simulate_rise_fall(hs.served, rise=2, fall=3), (hs.served, changes())

    # health_checks_total counts every check by result (the one in flight may be unrecorded)
    m = await p.metrics()
    failures = sum(1 for o in hs.served if o != 200)
    successes = len(hs.served) - failures
    assert m.value("stickyproxy_health_checks_total", backend="a", result="failure") == failures
    assert m.value("stickyproxy_health_checks_total", backend="a", result="success") in (
        successes - 1,
        successes,
    )
    assert m.value("stickyproxy_health_checks_total", backend="b", result="failure") == 0
    assert m.value("stickyproxy_health_checks_total", backend="b", result="success") > 0

    # and the changes are in the health log (warning level, naming the backend and why)
    msgs = [r.getMessage() for r in caplog.records if r.name == "stickyproxy.control.health"]
    assert any("backend a is DOWN" in m and "3 consecutive failed checks" in m for m in msgs), msgs
    assert any("backend a is UP" in m and "2 consecutive successful checks" in m for m in msgs), (
        msgs
    )
    assert all(
        r.levelno == logging.WARNING
        for r in caplog.records
        if r.name == "stickyproxy.control.health" and "backend a is" in r.getMessage()
    )


async def test_a_dropped_health_connection_counts_as_a_failure(backends, ops_proxy):
    bs = await backends("a", "b")
    hs = with_health(bs[0], HealthScript(hold="close"))
    p = await ops_proxy(bs, {"health": health_cfg(rise=1, fall=2)})
    await eventually(lambda: p.svc.table.states["a"].healthy is False, what="a marked down")
    view = (await p.backend_view())["a"]
    assert view["state"] == "down"
    assert view["reason"].startswith("2 consecutive failed checks (")
    assert "status" not in view["reason"], view["reason"]  # no status: the connection dropped
    assert all(o == "close" for o in hs.served)


async def test_one_dropped_check_is_one_failure_not_a_retry(backends, ops_proxy):
    bs = await backends("a", "b")
    hs = with_health(bs[0], HealthScript(hold=200))
    p = await ops_proxy(
        bs, {"health": health_cfg(rise=1, fall=3, interval="100ms", timeout="100ms")}
    )
    await eventually(lambda: hs.count >= 2, what="a couple of checks")
    hs.script("close")  # the next probe is dropped, then everything answers 200
    mark = hs.count
    await eventually(lambda: hs.count >= mark + 3, what="more checks")
    # one probe per check: probes are an interval apart (the next is sent only after the
    # previous result, so a stalled loop can only make the gaps longer)
    gaps = [round(t2 - t1, 4) for t1, t2 in zip(hs.times, hs.times[1:])]
    assert min(gaps) >= 0.05, list(zip(hs.served[1:], gaps))
    m = await p.metrics()
    assert m.value("stickyproxy_health_checks_total", backend="a", result="failure") >= 1


@pytest.mark.slow
async def test_damped_failback_keeps_users_on_their_fallback(backends, ops_proxy, attach_log):
    bs = await backends("a", "b", "c")
    hs = with_health(bs[0], HealthScript(hold=200))
    ups = attach_log("stickyproxy.control.health", probe=time.monotonic)
    p = await ops_proxy(bs, {"health": health_cfg(rise=1, fall=2, failback_delay="1s")})
    u = keys_where(p.pref, lambda pr: pr[0] == "a")[0]
    fallback = p.pref(u)[1]
    assert await _landed(p, u) == "a"

    hs.script(hold=500)
    await eventually(lambda: not p.svc.table.states["a"].healthy, what="a down")
    assert await _landed(p, u) == fallback

    hs.script(hold=200)
    await eventually(lambda: p.svc.table.states["a"].healthy, what="a up")
    up_at = [t for r, t in ups.records if "backend a is UP" in r.getMessage()][-1]
    # recovered, but its users stay where they are until the delay has passed
    view = (await p.backend_view())["a"]
    seen = time.monotonic()
    assert view["state"] == "failback-wait", view
    assert 1.0 - (seen - up_at) - 0.01 <= view["failback_in"] <= 1.0, (view, seen - up_at)
    route = await p.route(u)
    assert route["chosen"] == fallback and route["route"] == "failover"
    assert route["states"]["a"] == "failback-wait"
    assert await _landed(p, u) == fallback

    # then they return, and /route reports the same decision the data plane makes
    back = await eventually(
        lambda: _route_is(p, u, "a"), deadline=3, interval=0.02, what="/route back on a"
    )
    assert back["route"] == "primary"
    returned = time.monotonic()
    assert returned - up_at >= 1.0 - 0.02, returned - up_at
    assert await _landed(p, u) == "a"
    assert (await p.backend_view())["a"]["state"] == "up"


async def _route_is(p, key, bid):
    r = await p.route(key)
    return r if r["chosen"] == bid else None


async def test_panic_mode_routes_by_the_plain_ring(backends, ops_proxy):
    bs = await backends("a", "b", "c", "d")
    scripts = {b.id: with_health(b, HealthScript(hold=200)) for b in bs}
    p = await ops_proxy(bs, {"health": health_cfg(rise=1, fall=2, panic_threshold=50)})
    users = [f"user-{i}" for i in range(40)]
    owners = {u: p.pref(u)[0] for u in users}
    assert set(owners.values()) == {"a", "b", "c", "d"}

    # three of four fail their checks (25% usable < 50%): panic
    for bid in ("b", "c", "d"):
        scripts[bid].script(hold=500)
    await eventually(
        lambda: sum(st.healthy for st in p.svc.table.states.values()) == 1, what="b, c, d down"
    )
    before = await p.metrics()
    landed = {u: await _landed(p, u) for u in users}
    # users of the "down" backends are not piled onto "a": each stays on its ring owner
    assert landed == owners
    after = await p.metrics()
    panicked = sum(1 for u in users if owners[u] != "a")
    assert (
        after.value("stickyproxy_route_decisions_total", result="panic")
        - before.value("stickyproxy_route_decisions_total", result="panic")
    ) == panicked
    assert after.value("stickyproxy_route_decisions_total", result="failover") == before.value(
        "stickyproxy_route_decisions_total", result="failover"
    )
    u_c = next(u for u in users if owners[u] == "c")
    r = await p.route(u_c)
    assert r["route"] == "panic" and r["chosen"] == "c" and "panic" in r["why"]

    # one back (2 of 4 = 50%, not below the threshold): normal failover again
    scripts["b"].script(hold=200)
    await eventually(lambda: p.svc.table.states["b"].healthy, what="b up")
    r = await p.route(u_c)
    assert r["route"] == "failover"
    for u in users:
        want = next(b for b in p.pref(u) if b in ("a", "b"))
        assert await _landed(p, u) == want, u
