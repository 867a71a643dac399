"""Hot reload: POST /reload and Service.reload() (what SIGHUP runs) while traffic flows —
add, remove and reweight backends with no failed request; an invalid file is rejected with
its errors and the running config keeps serving; a [listen] change moves the listener while
old connections finish; and `stickyproxy run` + SIGHUP in a subprocess."""

from __future__ import annotations

import asyncio
import signal

import pytest

from stickyproxy.config import loads
from support.config import build_toml, keys_where, ring_of
from support.health import HealthScript, health_cfg, user_requests, with_health
from support.http import Client, http_request
from support.net import eventually, free_port


async def test_reload_under_load_adds_removes_and_reweights_without_failures(
    backends, ops_proxy, load_loops
):
    a, b, c, d = await backends("a", "b", "c", "d")
    p = await ops_proxy([a, b, c])
    fp0 = p.fingerprint
    ring0 = ring_of(p.svc.config)
    users = [f"user-{i}" for i in range(80)]
    load = load_loops(p.port, users, total=900, concurrency=10).start()

    # 1. add d (admin API)
    await load.reached(150)
    p.rewrite([a, b, c, d])
    r = await p.admin("POST", "/reload")
    assert r.status == 200, r.text
    fp1 = ring_of(p.svc.config).fingerprint
    assert r.json() == {"reloaded": True, "ring": fp1} and fp1 != fp0
    load.phase = "added"
    ring1 = ring_of(p.svc.config)

    # 2. remove b and reweight c (Service.reload, what SIGHUP runs)
    await load.reached(400)
    added_done = {o.rid for o in load.in_phase("added")}  # answered before the next reload
    c.weight = 3
    p.rewrite([a, c, d])
    ok, errors = await p.svc.reload("test")
    assert ok and errors == []
    load.phase = "removed"
    ring2 = ring_of(p.svc.config)
    fp2 = ring2.fingerprint
    assert fp2 not in (fp0, fp1)
    await load.finish()

    assert not load.failures, load.describe_failures()
    assert len(load.outcomes) == 900
    for o in load.outcomes:
        owners = {r.preference(o.user)[0] for r in (ring0, ring1, ring2)}
        if o.phase == "start":  # in flight during a reload: either ring
            assert o.backend in owners, (o.user, o.backend)
        elif o.rid in added_done:
            assert o.backend == ring1.preference(o.user)[0], (o.user, o.backend)
        elif o.phase == "added":
            assert o.backend in (ring1.preference(o.user)[0], ring2.preference(o.user)[0])
        else:
            assert o.backend == ring2.preference(o.user)[0], (o.user, o.backend)
    assert {o.backend for o in load.outcomes if o.rid in added_done} == {"a", "b", "c", "d"}
    assert {o.backend for o in load.in_phase("removed")} == {"a", "c", "d"}
    assert not [rec for rec in user_requests(b) if rec.one("X-Phase") == "removed"]
    # backends are told which ring routed each request
    for rec in user_requests(d):
        assert rec.one("X-Sticky-Ring") in (fp1, fp2)
    for rec in user_requests(c):
        if rec.one("X-Phase") == "removed":
            assert rec.one("X-Sticky-Ring") == fp2

    ring = (await p.admin("GET", "/ring")).json()
    assert ring["fingerprint"] == fp2
    assert {m["id"]: m["weight"] for m in ring["members"]} == {"a": 1, "c": 3, "d": 1}
    assert abs(sum(m["key_share"] for m in ring["members"]) - 1) < 1e-6
    assert set(await p.backend_view()) == {"a", "c", "d"}
    m = await p.metrics()
    assert m.value("stickyproxy_reloads_total", result="success") == 2
    assert m.value("stickyproxy_reloads_total", result="failure") == 0
    assert m.value("stickyproxy_ring_changes_total") == 2
    assert set(m.by("stickyproxy_backend_key_share", "backend")) == {"a", "c", "d"}


async def test_reload_that_keeps_the_ring_counts_no_ring_change(backends, ops_proxy):
    bs = await backends("a", "b")
    p = await ops_proxy(bs)
    p.rewrite(bs, {"timeouts": {"response": "4s"}})  # same ring, other settings
    assert (await p.admin("POST", "/reload")).status == 200
    assert p.svc.config.timeouts.response == 4.0
    m = await p.metrics()
    assert m.value("stickyproxy_reloads_total", result="success") == 1
    assert m.value("stickyproxy_ring_changes_total") == 0


async def test_invalid_config_is_rejected_and_the_old_one_keeps_serving(
    backends, ops_proxy, load_loops
):
    bs = await backends("a", "b")
    p = await ops_proxy(bs)
    fp = p.fingerprint
    users = [f"user-{i}" for i in range(20)]
    load = load_loops(p.port, users, total=300, concurrency=6).start()
    await load.reached(50)

    good = p.path.read_text()
    bad = good.replace(bs[1].url, "ftp://nowhere") + "\n[health]\nrise = 0\n"
    # (the [health] table is also repeated: a TOML error, reported as such)
    p.path.write_text(
        good.replace(bs[1].url, "ftp://nowhere").replace("[health]\n", "[health]\nrise = 0\n")
    )
    r = await p.admin("POST", "/reload")
    assert r.status == 400, r.text
    body = r.json()
    assert "rejected" in body["error"]
    errors = body["errors"]
    assert any(e.startswith("backends[1].url:") for e in errors), errors
    assert any(e.startswith("health.rise:") for e in errors), errors

    p.path.write_text(bad)  # not even TOML
    r = await p.admin("POST", "/reload")
    assert r.status == 400 and r.json()["errors"], r.text
    ok, errors = await p.svc.reload("test")  # the SIGHUP path says the same
    assert not ok and errors

    await load.finish()
    assert not load.failures, load.describe_failures()
    assert p.fingerprint == fp and (await p.admin("GET", "/ring")).json()["fingerprint"] == fp
    assert p.svc.config.backends[1].url == bs[1].url
    for o in load.outcomes:
        assert o.backend == p.pref(o.user)[0]
    m = await p.metrics()
    assert m.value("stickyproxy_reloads_total", result="failure") == 3
    assert m.value("stickyproxy_reloads_total", result="success") == 0
    assert m.value("stickyproxy_ring_changes_total") == 0


async def test_reload_moves_the_listener_while_old_connections_finish(backends, ops_proxy):
    (a,) = await backends("a")
    release = asyncio.Event()
    inner = a.handler

    async def handler(request, rec):
        if request.path == "/slow":
            await release.wait()
        return await inner(request, rec)

    a.handler = handler
    p = await ops_proxy([a])
    old_port = p.port
    old = await Client.connect(old_port)
    old.send(http_request("GET", "/slow", headers={"X-User-Id": "u"}))
    await eventually(lambda: any(r.target == "/slow" for r in a.requests), what="slow request")

    new_port = free_port()
    p.rewrite([a], {"listen": {"port": new_port}})
    r = await p.admin("POST", "/reload")
    assert r.status == 200, r.text
    assert p.port == new_port

    # the new port serves
    c = await Client.connect(new_port)
    c.send(http_request("GET", "/x", headers={"X-User-Id": "u"}))
    resp = await c.response()
    assert resp.status == 200 and resp.one("X-Backend") == "a"
    c.close()
    # the old one accepts nothing new
    with pytest.raises(OSError):
        await Client.connect(old_port, timeout=2)
    # the connection accepted on the old port finishes its request
    release.set()
    resp = await old.response()
    assert resp.status == 200 and resp.body.startswith(b"a GET /slow")
    old.close()


async def test_reload_to_a_busy_port_is_rejected_and_the_old_listener_stays(backends, ops_proxy):
    (a,) = await backends("a")
    p = await ops_proxy([a])
    old_port = p.port
    p.rewrite([a], {"listen": {"port": a.port}})  # a port something already listens on
    r = await p.admin("POST", "/reload")
    assert r.status == 400, r.text
    assert any(e.startswith("listen:") for e in r.json()["errors"]), r.text
    assert p.port == old_port
    resp = await p.get("/x", user="u")
    assert resp.status == 200 and resp.one("X-Backend") == "a"
    m = await p.metrics()
    assert m.value("stickyproxy_reloads_total", result="failure") == 1
    assert m.value("stickyproxy_reloads_total", result="success") == 0


async def test_health_state_follows_a_backend_whose_address_changed(backends, ops_proxy):
    a, b = await backends("a", "b")
    with_health(a, HealthScript(hold=500))
    p = await ops_proxy([a, b], {"health": health_cfg(rise=1, fall=1)})
    await eventually(lambda: not p.svc.table.states["a"].healthy, what="a down")

    (a2,) = await backends("a")  # "a" moves to a new address...
    moved = with_health(a2, HealthScript(hold=500))  # ...that fails its checks too
    p.rewrite([a2, b])
    assert (await p.admin("POST", "/reload")).status == 200
    assert p.svc.config.backends[0].url == a2.url
    await eventually(lambda: moved.count >= 4, what="checks of the new address")
    # four failed checks with fall = 1: "a" must be down, and its users elsewhere
    assert (await p.backend_view())["a"]["state"] == "down"
    u = keys_where(p.pref, lambda pr: pr[0] == "a")[0]
    r = await p.get("/x", user=u)
    assert r.one("X-Backend") == "b"


@pytest.mark.slow
async def test_sighup_reloads_a_running_proxy_process(backends, proxy_process):
    a, b, c = await backends("a", "b", "c")
    pp = proxy_process([a, b])
    await pp.wait_ready()
    path = pp.log.with_suffix(".toml")
    text = build_toml([a, b, c], {"listen": {"port": pp.port}})
    path.write_text(text)
    ring = ring_of(loads(text, str(path)))
    users = keys_where(ring.preference, lambda pr: pr[0] == "c", n=5)
    pp.signal(signal.SIGHUP)

    async def all_on_c() -> bool:
        for u in users:
            cl = await Client.connect(pp.port)
            try:
                cl.send(http_request("GET", "/x", headers={"X-User-Id": u}))
                r = await cl.response()
            finally:
                cl.close()
            assert r.status == 200, (r.status, r.body)
            if r.one("X-Backend") != "c":
                return False
        return True

    await eventually(all_on_c, deadline=10, interval=0.05, what="c serves its users")
    assert len(user_requests(c)) >= len(users)
    assert all(rec.one("X-Sticky-Ring") == ring.fingerprint for rec in user_requests(c))
    assert pp.proc.poll() is None


async def test_a_changed_file_is_reloaded_when_watched_and_a_bad_one_is_not(backends, proxy):
    """run --watch-config: the file's change is applied like SIGHUP; an invalid change is
    refused and the running configuration stays until the next change."""
    a, b = await backends("a", "b")
    p = await proxy([a])
    watching = asyncio.Event()
    watcher = asyncio.get_running_loop().create_task(p.svc.reloader.watch_files(0.02, watching))
    try:
        await asyncio.wait_for(watching.wait(), 5)
        p.path.write_text(build_toml([a, b]))
        await eventually(lambda: set(p.svc.table.states) == {"a", "b"}, what="b added")
        p.path.write_text(build_toml([a, b]) + "\n[nonsense]\n")
        refused = p.svc.process.control.stats.counters["reloads"]
        await eventually(lambda: refused.get(("failure",), 0) >= 1, what="refused once")
        assert set(p.svc.table.states) == {"a", "b"}
        p.path.write_text(build_toml([b]))
        await eventually(lambda: set(p.svc.table.states) == {"b"}, what="a removed")
    finally:
        watcher.cancel()


@pytest.mark.slow
async def test_run_watch_config_with_workers_reloads_every_worker(backends, proxy_process):
    a, b = await backends("a", "b")
    pp = proxy_process([a], workers=2, args=("--watch-config",))
    await pp.wait_ready()
    path = pp.log.with_suffix(".toml")
    text = build_toml([b], {"listen": {"port": pp.port}})
    path.write_text(text)

    async def all_on_b() -> bool:
        for i in range(20):  # new connections: both workers answer some
            cl = await Client.connect(pp.port)
            try:
                cl.send(http_request("GET", "/x", headers={"X-User-Id": f"u{i}"}))
                r = await cl.response()
            finally:
                cl.close()
            if r.one("X-Backend") != "b":
                return False
        return True

    await eventually(all_on_b, deadline=15, interval=0.2, what="every worker routes to b")
