"""Slow clients and overload (docs/THREAT_MODEL.md T5, T6).

Builds on tests/dataplane/test_limits.py (header deadline, idle timeout, connection cap,
streaming limits, stalled body) and tests/dataplane/test_capacity.py (per-backend cap and
queue). What is added here is the attacker's view: slow connections trying to hold every
slot, a body trickled under ``limits.min_body_rate``, 1,000 slow connections against a real
``stickyproxy run`` process (memory and descriptors), a crowd against one backend's cap,
and a retry storm against the retry budget.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import time

import pytest

from support.config import ring_of
from support.http import Client, http_request

from .judges import metric, strict_responder

TICK = 0.1  # the proxy checks deadlines on this period (dataplane/proxy.py TICK)
SLACK = 0.5  # scheduling noise on top of a deadline + one tick
# exchange.py: a slow body is judged only after BODY_RATE_GRACE, every BODY_RATE_CHECK
BODY_RATE_GRACE, BODY_RATE_CHECK = 2.0, 1.0
PARTIAL_HEAD = b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\n"


async def _trickle(conns: list[Client], stop: asyncio.Event, every: float) -> None:
    """A header field every ``every`` seconds on each connection: never a whole head."""
    i = 0
    while not stop.is_set():
        for c in conns:
            if not c.writer.is_closing():
                try:
                    c.send(b"X-Slow-%d: 1\r\n" % i)
                except (ConnectionError, RuntimeError):
                    pass
        i += 1
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


# ---------------------------------------------------------------------------------------
# slowloris against the connection cap


@pytest.mark.slow
async def test_slowloris_cannot_hold_the_connection_cap(raw_backend, proxy):
    be = await raw_backend("a", strict_responder())
    p = await proxy(
        [be], {"limits": {"max_client_connections": 20}, "timeouts": {"client_header": "1s"}}
    )
    slow = []
    t0 = time.monotonic()
    for _ in range(20):
        c = await p.client()
        c.send(PARTIAL_HEAD)
        slow.append(c)
    stop = asyncio.Event()
    task = asyncio.create_task(_trickle(slow, stop, 0.1))
    try:
        # every slot is held: a newcomer is told so at once, not left hanging
        extra = await p.client()
        t1 = time.monotonic()
        r = await extra.response(timeout=2)
        assert r.status == 503 and time.monotonic() - t1 < 0.5
        assert await extra.closed()
        # the header deadline frees every slot, with a 408 to each slow client
        for c in slow:
            r = await c.response(timeout=3)
            assert r.status == 408
            assert await c.closed()
        took = time.monotonic() - t0
        assert took <= 1.0 + TICK + SLACK + 0.3, took
    finally:
        stop.set()
        await task
    ok = await p.get("/", user="u")
    assert ok.status == 200
    assert be.raw.count(b"GET / HTTP/1.1") == 1  # only the real request got through


# ---------------------------------------------------------------------------------------
# limits.min_body_rate


@pytest.mark.slow
async def test_body_slower_than_min_body_rate_gets_408_in_bounded_time(raw_backend, proxy):
    be = await raw_backend("a", strict_responder())
    p = await proxy(
        [be],
        {"limits": {"min_body_rate": 1000}, "timeouts": {"body_idle": "10s", "response": "10s"}},
    )
    c = await p.client()
    t0 = time.monotonic()
    c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\nContent-Length: 100000\r\n\r\n")
    stop = asyncio.Event()

    async def trickle():  # 100 bytes every 250 ms = 400 B/s
        while not stop.is_set():
            try:
                c.send(b"x" * 100)
            except (ConnectionError, RuntimeError):
                return
            await asyncio.sleep(0.25)

    task = asyncio.create_task(trickle())
    try:
        r = await c.response(timeout=6)
    finally:
        stop.set()
        await task
    took = time.monotonic() - t0
    assert r.status == 408 and b"slower than 1000 bytes/s" in r.body, r.body
    # judged after the grace period, at the next check: never a hang, never before
    assert BODY_RATE_GRACE <= took <= BODY_RATE_GRACE + BODY_RATE_CHECK + TICK + SLACK, took
    assert await c.closed()
    # the backend was not left holding a request it would process: it got a prefix only,
    # and that connection was closed
    for conn in be.connections:
        assert not conn.requests
    await asyncio.sleep(0.1)
    assert all(conn.eof for conn in be.connections if conn.raw)


@pytest.mark.slow
async def test_body_at_the_min_body_rate_is_not_cut(raw_backend, proxy):
    be = await raw_backend("a", strict_responder())
    p = await proxy(
        [be],
        {"limits": {"min_body_rate": 1000}, "timeouts": {"body_idle": "10s", "response": "10s"}},
    )
    c = await p.client()
    total = 4 * 1000 * 4  # 4 s at 4,000 B/s: 4× the minimum
    c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\nContent-Length: %d\r\n\r\n" % total)
    for _ in range(16):
        c.send(b"y" * 1000)
        await asyncio.sleep(0.25)
    r = await c.response(timeout=5)
    c.close()
    assert r.status == 200


# ---------------------------------------------------------------------------------------
# 1,000 slow connections against a real proxy process


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = hard if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        pytest.skip(f"RLIMIT_NOFILE {soft} < {want}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


N_SLOW = 1000
RSS_BOUND_KB = 50 * 1024  # the stated bound: < 50 MB of growth for 1,000 slow heads
HEADER_DEADLINE = 4.0


@pytest.mark.slow
async def test_thousand_slow_connections_bounded_memory_and_all_closed(backends, proxy_process):
    _raise_nofile(N_SLOW * 2 + 512)  # our 1,000 ends + the proxy's (its own limit
    (a,) = await backends("a")  # is inherited from this process)
    pp = proxy_process(
        [a],
        {
            "timeouts": {"client_header": f"{HEADER_DEADLINE:g}s"},
            "limits": {"max_client_connections": N_SLOW + 100},
        },
    )
    await pp.wait_ready()
    for i in range(50):  # warm: pools, caches, the allocator
        c = await Client.connect(pp.port)
        c.send(http_request("GET", f"/w{i}", headers={"X-User-Id": f"u{i}"}))
        assert (await c.response()).status == 200
        c.close()
    await asyncio.sleep(0.2)
    rss0 = pp.status_field("VmRSS")
    fds0 = _fds(pp.pid)

    conns: list[Client] = []
    opened: list[float] = []
    for batch in range(N_SLOW // 100):
        got = await asyncio.gather(*[Client.connect(pp.port) for _ in range(100)])
        for c in got:
            c.send(PARTIAL_HEAD)
            conns.append(c)
            opened.append(time.monotonic())
    stop = asyncio.Event()
    task = asyncio.create_task(_trickle(conns, stop, 0.5))
    peak = rss0
    closed_at: dict[int, float] = {}

    async def watch(i: int, c: Client) -> None:
        try:
            r = await c.response(timeout=HEADER_DEADLINE + 3)
            assert r.status == 408, r.status
            await c.closed(timeout=3)
        finally:
            closed_at[i] = time.monotonic()
            c.close()

    watchers = [asyncio.create_task(watch(i, c)) for i, c in enumerate(conns)]
    try:
        # while they are all open: the proxy holds them and still serves others
        t_end = opened[0] + HEADER_DEADLINE - 0.5
        fds_peak = fds0
        while time.monotonic() < t_end:
            peak = max(peak, pp.status_field("VmRSS"))
            fds_peak = max(fds_peak, _fds(pp.pid))
            await asyncio.sleep(0.1)
        assert fds_peak >= fds0 + N_SLOW * 0.95, (fds0, fds_peak)
        c = await Client.connect(pp.port)
        c.send(http_request("GET", "/during", headers={"X-User-Id": "real"}))
        t1 = time.monotonic()
        assert (await c.response(timeout=2)).status == 200
        assert time.monotonic() - t1 < 1.0
        c.close()
        await asyncio.gather(*watchers)
    finally:
        stop.set()
        await task
        for w in watchers:
            w.cancel()
    growth = peak - rss0
    print(
        f"\n{N_SLOW} slow connections: VmRSS {rss0} kB -> peak {peak} kB "
        f"(+{growth} kB, {growth * 1024 / N_SLOW:.0f} B per connection)"
    )
    assert growth < RSS_BOUND_KB, f"RSS grew by {growth} kB for {N_SLOW} slow connections"
    # every one was answered 408 and closed by the header deadline (+ a tick + load slack)
    worst = max(closed_at[i] - opened[i] for i in range(N_SLOW))
    assert worst <= HEADER_DEADLINE + TICK + 1.5, worst
    deadline = time.monotonic() + 5
    while _fds(pp.pid) > fds0 + 10:  # the proxy's ends are gone too
        assert time.monotonic() < deadline, (fds0, _fds(pp.pid))
        await asyncio.sleep(0.05)
    assert pp.proc.poll() is None


# ---------------------------------------------------------------------------------------
# a crowd against one backend's in-flight cap


async def test_crowd_never_exceeds_the_backend_cap_and_overflow_is_refused_fast(raw_backend, proxy):
    release = asyncio.Event()
    state = {"now": 0, "max": 0}

    async def held(conn):
        while (req := await conn.request(timeout=30)) is not None:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            await release.wait()
            state["now"] -= 1
            conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                % (len(req.target), req.target.encode())
            )

    be = await raw_backend("a", held)
    cap, queue = 3, 5
    p = await proxy(
        [be],
        {
            "limits": {"max_inflight_per_backend": cap, "queue_per_backend": queue},
            "timeouts": {"queue": "3s"},
        },
    )
    clients = []
    for i in range(30):
        c = await p.client()
        c.send(http_request("GET", f"/r{i}", headers={"X-User-Id": f"user-{i}"}))
        clients.append(c)
    t0 = time.monotonic()
    results: dict[int, int] = {}

    async def read(i, c):
        r = await c.response(timeout=6)
        results[i] = r.status
        if r.status == 503:
            assert r.has("Retry-After")
            assert time.monotonic() - t0 < 1.0, "an overflow request was left waiting"

    readers = [asyncio.create_task(read(i, c)) for i, c in enumerate(clients)]
    while sum(1 for s in results.values() if s == 503) < 30 - cap - queue:
        assert time.monotonic() - t0 < 2, results
        await asyncio.sleep(0.01)
    assert state["now"] == cap and len(p.svc.proxy.upstreams["a"].waiters) == queue
    release.set()
    await asyncio.gather(*readers)
    for c in clients:
        c.close()
    assert sorted(results.values()) == [200] * (cap + queue) + [503] * (30 - cap - queue)
    assert state["max"] == cap
    assert len(be.requests) == cap + queue


# ---------------------------------------------------------------------------------------
# the retry budget: it limits retries after timeouts (what an overloaded backend does), and
# leaves failover from a dead backend alone (dataplane/retry.py)


async def _budget_rig(raw_backend, proxy, bad_script, n, budget_min, budget_percent):
    arrived = {"good_now": 0, "good_max": 0, "good": 0}
    release = asyncio.Event()

    async def holder(conn):  # the retry target holds what it gets
        while await conn.request(timeout=10) is not None:
            arrived["good"] += 1
            arrived["good_now"] += 1
            arrived["good_max"] = max(arrived["good_max"], arrived["good_now"])
            await release.wait()
            arrived["good_now"] -= 1
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    bad = await raw_backend("bad", bad_script)
    good = await raw_backend("good", holder)
    p = await proxy(
        [bad, good],
        {
            "admin": {"enabled": True, "port": 0},
            "passive": {"enabled": False},
            "timeouts": {"response": "300ms"},
            "retries": {"attempts": 2, "budget_min": budget_min, "budget_percent": budget_percent},
        },
    )
    ring = ring_of(p.config)
    users = list(
        itertools.islice(
            (u for u in (f"user-{i}" for i in range(5000)) if ring.preference(u)[0] == "bad"), n
        )
    )
    assert len(users) == n
    clients = []
    for u in users:
        c = await p.client()
        c.send(http_request("GET", "/", headers={"X-User-Id": u}))
        clients.append(c)
    statuses: list[int] = []

    async def read(c):
        r = await c.response(timeout=8)
        statuses.append(r.status)

    readers = [asyncio.create_task(read(c)) for c in clients]
    # every request failed on "bad": each one was either answered or is held at "good"
    t0 = time.monotonic()
    while len(statuses) + arrived["good_now"] < n:
        assert time.monotonic() - t0 < 5, (statuses, arrived)
        await asyncio.sleep(0.01)
    held = arrived["good_now"]
    release.set()
    await asyncio.gather(*readers)
    for c in clients:
        c.close()
    assert p.svc.proxy.retrying == 0 and p.svc.proxy.active == 0
    return p, statuses, arrived, held


async def test_retry_budget_bounds_retries_after_timeouts(raw_backend, proxy):
    """A backend that takes every request and never answers (overload): retries of the
    timed-out requests stay within the budget, and each one not made is counted."""
    n, budget_min, budget_percent = 40, 2, 10

    async def silent(conn):
        await conn.request(timeout=10)
        await asyncio.sleep(10)

    p, statuses, arrived, held = await _budget_rig(
        raw_backend, proxy, silent, n, budget_min, budget_percent
    )
    allowed = max(budget_min, n * budget_percent // 100)
    assert 1 <= held <= allowed, (held, allowed)
    assert arrived["good_max"] <= allowed
    assert statuses.count(200) == arrived["good"] == held
    assert statuses.count(504) == n - held
    admin = p.svc.admin.port
    assert await metric(admin, "stickyproxy_retries_total", backend="bad", reason="timeout") == held
    assert (
        await metric(admin, "stickyproxy_retries_denied_total", backend="bad", reason="budget")
        == n - held
    )


async def test_requests_reset_by_a_dead_backend_are_all_retried(raw_backend, proxy):
    """A backend whose connections drop every request before answering (it died): failover
    is not limited by the budget, so with the same tight budget every request succeeds."""
    n = 40

    async def resetter(conn):
        if await conn.request(timeout=10) is not None:
            conn.abort()

    p, statuses, arrived, held = await _budget_rig(raw_backend, proxy, resetter, n, 2, 10)
    assert statuses == [200] * n
    admin = p.svc.admin.port
    assert await metric(admin, "stickyproxy_retries_total", backend="bad", reason="reset") == n
    assert (
        await metric(admin, "stickyproxy_retries_denied_total", backend="bad", reason="budget") == 0
    )


@pytest.mark.slow
async def test_stale_connection_retries_are_free_of_the_budget_and_of_blame(raw_backend, proxy):
    """Every reused connection is reset before answering (the keep-alive race, n times at
    once): each request is retried on a new connection to the same backend, none is
    refused for want of budget, and passive health does not count the races."""
    n = 12
    release = asyncio.Event()
    warmed = asyncio.Event()
    seen = {"now": 0, "max": 0, "fresh": 0, "warm": 0}

    async def first_only(conn):
        """Answers the first request on a connection (held until released) and resets the
        connection on the second: every reused connection looks stale."""
        req = await conn.request(timeout=10)
        if req is None:
            return
        if req.target == "/warm":
            # hold every warm-up answer until all n connections are open, so none is reused
            seen["warm"] += 1
            if seen["warm"] == n:
                warmed.set()
            await warmed.wait()
        else:
            seen["fresh"] += 1
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            await release.wait()
            seen["now"] -= 1
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if await conn.request(timeout=10) is not None:
            conn.abort()

    be = await raw_backend("a", first_only)
    p = await proxy(
        [be],
        {"passive": {"consecutive_failures": 2}, "retries": {"budget_min": 1, "budget_percent": 0}},
    )
    warm = []
    for i in range(n):  # n pooled upstream connections
        c = await p.client()
        c.send(http_request("GET", "/warm", headers={"X-User-Id": "u"}))
        warm.append(c)
    for c in warm:
        assert (await c.response()).status == 200
        c.close()
    assert len(be.connections) == n
    clients = []
    for i in range(n):  # each reuses one, which resets
        c = await p.client()
        c.send(http_request("GET", f"/r{i}", headers={"X-User-Id": "u"}))
        clients.append(c)
    t0 = time.monotonic()
    while len(be.connections) < 2 * n and time.monotonic() - t0 < 1.5:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    concurrent = seen["now"]
    release.set()
    statuses = []
    for c in clients:
        try:
            statuses.append((await c.response(timeout=3)).status)
        except AssertionError:
            statuses.append(None)
        c.close()
    # every request's reused connection was reset: each was retried on a new connection,
    # all at once, though the budget allows one budgeted retry at a time
    counters = p.svc.observer.stats.counters
    assert counters["retries"].get(("a", "stale-connection"), 0) == n, counters["retries"]
    assert statuses == [200] * n, statuses
    assert concurrent == n, f"only {concurrent} of {n} stale retries were made at once"
    assert not counters.get("retries_denied"), counters.get("retries_denied")
    assert counters["upstream_errors"].get(("a", "stale"), 0) == n
    assert p.svc.table.states["a"].usable(time.monotonic()), "races ejected the backend"
