"""Passive health: consecutive failed exchanges eject a backend for base_ejection × n
(capped at max_ejection), 5xx count only with on_5xx, and max_ejected_percent caps how
many backends are out at once. Observed through /backends, /metrics and where users land."""

from __future__ import annotations

import logging
import time

from support.backends import DeadBackend
from support.config import keys_where
from support.health import health_cfg, user_requests
from support.net import eventually


def passive(**kw):
    base = {
        "enabled": True,
        "consecutive_failures": 3,
        "connect_down": "0s",
        "base_ejection": "200ms",
        "max_ejection": "500ms",
        "max_ejected_percent": 50,
    }
    base.update(kw)
    return base


async def _ok_from(p, user: str) -> str:
    r = await p.get("/x", user=user)
    assert r.status == 200, (r.status, r.body)
    return r.one("X-Backend")


async def _not_ejected(p, bid: str) -> bool:
    return (await p.backend_view())[bid]["state"] != "ejected"


async def test_connect_failures_eject_for_growing_capped_times(backends, ops_proxy, attach_log):
    a, b = await backends("a", "b")
    d = DeadBackend("d")
    log = attach_log("stickyproxy.control.health")
    p = await ops_proxy([a, b, d], {"passive": passive()})
    users = keys_where(p.pref, lambda pr: pr[0] == "d", n=3)

    for n, expected in ((1, 0.2), (2, 0.4), (3, 0.5)):  # 200ms × n, capped at 500ms
        if n > 1:
            await eventually(
                lambda: _not_ejected(p, "d"),
                deadline=3,
                interval=0.02,
                what=f"ejection {n - 1} over",
            )
        errors_before = (await p.metrics()).value(
            "stickyproxy_upstream_errors_total", backend="d", kind="connect"
        )
        for i, u in enumerate(users):  # three refused connects in a row
            if i == 2:
                t0 = time.monotonic()  # the ejection starts after this
            assert await _ok_from(p, u) == p.pref(u)[1]  # each retried on the next one
        view = (await p.backend_view())["d"]
        elapsed = time.monotonic() - t0
        assert view["state"] == "ejected" and view["usable"] is False, view
        assert view["ejections"] == n
        assert expected - elapsed - 0.001 <= view["ejected_for"] <= expected + 0.001, (
            n,
            view["ejected_for"],
            elapsed,
        )
        assert view["reason"] == "3 consecutive failures"
        m = await p.metrics()
        assert m.value("stickyproxy_ejections_total", backend="d") == n
        assert (
            m.value("stickyproxy_upstream_errors_total", backend="d", kind="connect")
            == errors_before + 3
        )
        assert m.value("stickyproxy_backend_up", backend="d") == 0
        # while ejected its users go straight to their next backend: no connect is tried
        for u in users:
            assert await _ok_from(p, u) == p.pref(u)[1]
        m2 = await p.metrics()
        assert (
            m2.value("stickyproxy_upstream_errors_total", backend="d", kind="connect")
            == errors_before + 3
        )
    assert (await p.route(users[0]))["states"]["d"] == "ejected"
    msgs = log.messages()
    assert sum("backend d ejected for" in m for m in msgs) == 3, msgs
    assert any("(ejection #3)" in m for m in msgs), msgs
    assert (await p.metrics()).value("stickyproxy_ejections_total", backend="a") == 0


async def test_resets_count_as_failures(backends, ops_proxy, raw_backend):
    async def reset_after_request(conn):
        await conn.request()
        conn.abort()

    a, b = await backends("a", "b")
    r = await raw_backend("r", reset_after_request)
    p = await ops_proxy([a, b, r], {"passive": passive(base_ejection="5s", max_ejection="5s")})
    users = keys_where(p.pref, lambda pr: pr[0] == "r", n=3)
    for u in users:  # GET without a body: retried on the next backend
        assert await _ok_from(p, u) == p.pref(u)[1]
    view = (await p.backend_view())["r"]
    assert view["state"] == "ejected" and view["ejections"] == 1
    m = await p.metrics()
    assert m.value("stickyproxy_upstream_errors_total", backend="r", kind="reset") == 3
    assert m.value("stickyproxy_ejections_total", backend="r") == 1
    assert m.value("stickyproxy_retries_total", backend="r", reason="reset") == 3
    got = len(r.requests)
    assert await _ok_from(p, users[0]) == p.pref(users[0])[1]
    assert len(r.requests) == got  # ejected: not contacted


async def _always_500(request, rec):
    from aiohttp import web

    return web.Response(
        status=500, text=f"{rec.backend} broken\n", headers={"X-Backend": rec.backend}
    )


async def test_5xx_eject_only_with_on_5xx(backends, ops_proxy):
    a, b, f = await backends("a", "b", "f")
    f.handler = _always_500
    p = await ops_proxy(
        [a, b, f], {"passive": passive(on_5xx=True, base_ejection="5s", max_ejection="5s")}
    )
    users = keys_where(p.pref, lambda pr: pr[0] == "f", n=4)
    for u in users[:3]:
        r = await p.get("/x", user=u)
        assert r.status == 500 and r.one("X-Backend") == "f"  # passed through, not retried
    view = (await p.backend_view())["f"]
    assert view["state"] == "ejected" and view["ejections"] == 1, view
    assert (await p.metrics()).value("stickyproxy_ejections_total", backend="f") == 1
    assert await _ok_from(p, users[3]) == p.pref(users[3])[1]
    assert len(user_requests(f)) == 3


async def test_5xx_do_not_eject_without_on_5xx(backends, ops_proxy):
    a, b, f = await backends("a", "b", "f")
    f.handler = _always_500
    p = await ops_proxy([a, b, f], {"passive": passive(on_5xx=False)})
    users = keys_where(p.pref, lambda pr: pr[0] == "f", n=8)
    for u in users:
        r = await p.get("/x", user=u)
        assert r.status == 500 and r.one("X-Backend") == "f"
    view = (await p.backend_view())["f"]
    assert view["state"] == "up" and view["ejections"] == 0
    m = await p.metrics()
    assert m.value("stickyproxy_ejections_total", backend="f", default=0) == 0
    assert m.value("stickyproxy_requests_total", backend="f", code_class="5xx") == 8


async def test_max_ejected_percent_caps_simultaneous_ejections(backends, ops_proxy, caplog):
    (a,) = await backends("a")
    dead = [DeadBackend(f"d{i}") for i in (1, 2, 3)]
    caplog.set_level(logging.WARNING, logger="stickyproxy.control.health")
    p = await ops_proxy(
        [a, *dead],
        {
            "passive": passive(base_ejection="30s", max_ejection="60s", max_ejected_percent=50),
            "health": {"enabled": False, "panic_threshold": 0},
            "retries": {"attempts": 3},
        },
    )
    by_owner = {d.id: keys_where(p.pref, lambda pr, i=d.id: pr[0] == i, n=3) for d in dead}
    for _round in range(2):  # every dead backend fails 3+ times in a row
        for d in dead:
            for u in by_owner[d.id]:
                assert await _ok_from(p, u) == "a"
    view = await p.backend_view()
    ejected = sorted(bid for bid, v in view.items() if v["state"] == "ejected")
    assert len(ejected) == 2, {bid: v["state"] for bid, v in view.items()}  # 50% of 4
    (kept,) = [d.id for d in dead if d.id not in ejected]
    assert view[kept]["ejections"] == 0 and view[kept]["usable"] is True
    m = await p.metrics()
    assert sum(m.by("stickyproxy_ejections_total", "backend").values()) == 2
    assert m.value("stickyproxy_ejections_total", backend=kept, default=0) == 0
    # the one left in keeps failing and keeps being skipped by retries, never ejected
    errs = m.value("stickyproxy_upstream_errors_total", backend=kept, kind="connect")
    for u in by_owner[kept]:
        assert await _ok_from(p, u) == "a"
    m = await p.metrics()
    assert m.value("stickyproxy_upstream_errors_total", backend=kept, kind="connect") == errs + 3
    assert sum(m.by("stickyproxy_ejections_total", "backend").values()) == 2


async def test_a_passing_health_check_lifts_a_passive_ejection(
    raw_backend, backends, ops_proxy, attach_log
):
    """Envoy's successful_active_health_check_uneject_host: a backend ejected for failed
    exchanges (here while it was restarting) is back as soon as an active check passes,
    not after base_ejection (30 s here)."""
    serving = {"data": False}

    async def restarting(conn):
        while True:
            req = await conn.request()
            if req is None:
                return
            if req.target == "/healthz" or serving["data"]:
                conn.send(b"HTTP/1.1 200 OK\r\nX-Backend: r\r\nContent-Length: 2\r\n\r\nok")
            else:
                conn.abort()
                return

    r = await raw_backend("r", restarting)
    (b,) = await backends("b")
    log = attach_log("stickyproxy.control.health")
    p = await ops_proxy(
        [r, b],
        {
            "passive": passive(base_ejection="30s", max_ejection="60s", max_ejected_percent=100),
            "health": health_cfg(interval="100ms", timeout="100ms", rise=1, fall=1),
        },
    )
    users = keys_where(p.pref, lambda pr: pr[0] == "r", n=3)
    for u in users:  # three resets in a row: ejected
        assert await _ok_from(p, u) == "b"
    assert (await p.metrics()).value("stickyproxy_ejections_total", backend="r") == 1
    serving["data"] = True
    t0 = time.monotonic()
    await eventually(
        lambda: _not_ejected(p, "r"), deadline=3, interval=0.02, what="ejection lifted"
    )
    assert time.monotonic() - t0 < 2.0  # a check or two, not 30 s
    assert await _ok_from(p, users[0]) == "r"
    assert any("ejection lifted by a passing health check" in m for m in log.messages())
