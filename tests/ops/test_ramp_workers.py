"""`stickyproxy run --workers 2`: the supervisor decides a backend's recovery and its
ramp, and every worker, including one restarted in the middle of the ramp, returns each
user at the instant the supervisor's /route says; a backend a reload adds starts slowly on
every worker the same way."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from support.config import build_toml
from support.health import HealthScript, health_cfg, with_health
from support.net import eventually
from support.procs import established_to, listening_on

from .test_workers import one_request, start_supervised, worker_pids

pytestmark = pytest.mark.slow

# a request's routing instant is known to within this (taken between two clock reads, in
# another process reading the same CLOCK_MONOTONIC; plus the control message's latency)
EDGE = 0.05
# long enough for a worker killed at its start to be restarted well before its end
RAMP = 6
# checks that a busy 2-core machine does not fail: starting a worker stalled the
# supervisor past a 100 ms check timeout, and every backend flapped (and ramped) at once
STEADY = {"interval": "500ms", "timeout": "500ms"}


async def test_workers_follow_the_supervisors_ramp(backends, proxy_process):
    bs = await backends("a", "b", "c")
    hs = with_health(bs[0], HealthScript(hold=200))
    pp, admin = await start_supervised(
        bs,
        proxy_process,
        {"health": health_cfg(rise=1, fall=2, failback_ramp=f"{RAMP}s", **STEADY)},
    )

    async def view(key: str) -> dict:
        status, text = await admin.call("GET", f"/route?key={key}")
        assert status == 200, text
        return json.loads(text)

    users = [f"user-{i}" for i in range(400)]
    owned = [u for u in users if (await view(u))["owner"] == "a"][:60]
    hs.script(hold=500)
    await eventually(lambda: _state(admin, "a", "down"), what="a down")
    hs.script(hold=200)
    await eventually(lambda: _state(admin, "a", "ramping"), what="a ramping")
    # a worker restarted now learns the ramp from the supervisor, not from its own start
    victim = worker_pids(pp.pid)[0]
    os.kill(victim, signal.SIGKILL)
    await eventually(
        lambda: (
            len(worker_pids(pp.pid)) == 2
            and victim not in worker_pids(pp.pid)
            and all(listening_on(w, pp.port) for w in worker_pids(pp.pid))
        ),
        deadline=10,
        interval=0.05,
        what="the worker restarted and listening",
    )

    # when each user returns, by the supervisor's clock (the same monotonic clock)
    returns = {}
    for u in owned:
        t0 = time.monotonic()
        doc = await view(u)
        returns[u] = t0 + doc["ramps"]["a"]["returns_in"]
        fallback = doc["preference"][1]
        returns[u] = (returns[u], fallback)
    checked = 0
    end = time.monotonic() + RAMP
    while time.monotonic() < end:
        for u in owned:
            before = time.monotonic()
            status, got = await one_request(pp.port, u)  # a new connection: any worker
            after = time.monotonic()
            assert status == 200
            at, fallback = returns[u]
            if at < before - EDGE:
                assert got == "a", (u, before - at)
                checked += 1
            elif at > after + EDGE:
                assert got == fallback, (u, at - after)
                checked += 1
    assert checked >= len(owned) * 2
    # both workers served users during the ramp, the restarted one included
    ports = {b.port for b in bs}
    assert all(established_to(pid, ports) > 0 for pid in worker_pids(pp.pid))
    assert await _state(admin, "a", "up")


async def _state(admin, bid: str, state: str) -> bool:
    status, text = await admin.call("GET", "/backends")
    if status != 200:
        return False
    return any(b["id"] == bid and b["state"] == state for b in json.loads(text)["backends"])


async def test_workers_start_a_reloaded_backend_slowly_as_the_supervisor_says(
    backends, proxy_process
):
    a, b = await backends("a", "b")
    settings = {"health": {"enabled": False, "failback_ramp": "8s"}}
    pp, admin = await start_supervised([a, b], proxy_process, settings)

    (c,) = await backends("c")
    pp.log.with_suffix(".toml").write_text(
        build_toml(
            [a, b, c],
            {
                **settings,
                "admin": {"enabled": True, "port": admin.port},
                "listen": {"port": pp.port},
            },
        )
    )
    status, body = await admin.call("POST", "/reload")
    assert status == 200, body
    assert await _state(admin, "c", "ramping")

    async def view(key: str) -> dict:
        status, text = await admin.call("GET", f"/route?key={key}")
        assert status == 200, text
        return json.loads(text)

    returns = {}
    for i in range(300):
        u = f"user-{i}"
        t0 = time.monotonic()
        doc = await view(u)
        if doc["owner"] == "c":
            returns[u] = (t0 + doc["ramps"]["c"]["returns_in"], doc["preference"][1])
    assert len(returns) >= 40
    checked = {"c": 0, "fallback": 0}
    end = time.monotonic() + 8
    while time.monotonic() < end:
        for u, (at, fallback) in returns.items():
            before = time.monotonic()
            status, got = await one_request(pp.port, u)
            after = time.monotonic()
            assert status == 200
            if at < before - EDGE:
                assert got == "c", (u, before - at)
                checked["c"] += 1
            elif at > after + EDGE:
                assert got == fallback, (u, at - after)
                checked["fallback"] += 1
    assert checked["c"] > 20 and checked["fallback"] > 20, checked
