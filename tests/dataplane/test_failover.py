"""Failure handling (DESIGN.md P3, P5): failover along each key's preference list, which
requests are retried after a failure, and what the client gets when nothing works."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from stickyproxy.routing.ring import Member, Ring
from support.backends import DeadBackend, respond_with
from support.http import IncompleteResponse, http_request
from support.net import eventually

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def keys_where(p, pred, n: int = 1, prefix: str = "user") -> list[str]:
    """The first ``n`` keys ``user-0, user-1, ...`` whose preference list satisfies ``pred``."""
    out = []
    for i in range(100_000):
        k = f"{prefix}-{i}"
        if pred(p.pref(k)):
            out.append(k)
            if len(out) == n:
                return out
    raise AssertionError("no such key")


async def _hang(conn):
    """Read requests and never answer."""
    while await conn.request(timeout=60) is not None:
        pass


async def _close_after_request(conn):
    """Read one whole request, then close without answering."""
    await conn.request()
    conn.close()


async def test_killing_one_of_three_backends_fails_no_get_and_moves_only_its_users(backends, proxy):
    bs = await backends("a", "b", "c")
    by_id = {b.id: b for b in bs}
    p = await proxy(bs)
    users = [f"user-{i}" for i in range(60)]
    victim = by_id[p.pref(users[0])[0]]
    failures: list[str] = []
    landed: dict[str, set[str]] = {u: set() for u in users}
    stop = asyncio.Event()

    async def traffic(worker: int) -> None:
        async with aiohttp.ClientSession() as s:
            i = worker
            while not stop.is_set():
                u = users[i % len(users)]
                i += 7
                try:
                    async with s.get(
                        f"http://127.0.0.1:{p.port}/",
                        headers={"X-User-Id": u},
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as r:
                        body = await r.read()
                        if r.status != 200:
                            failures.append(f"{u}: {r.status} {body[:80]!r}")
                        else:
                            landed[u].add(r.headers["X-Backend"])
                except (aiohttp.ClientError, TimeoutError) as e:
                    failures.append(f"{u}: {e!r}")

    tasks = [asyncio.create_task(traffic(w)) for w in range(6)]
    await eventually(lambda: all(landed.values()), what="every user served once")
    before = {u: set(v) for u, v in landed.items()}
    await victim.stop()  # mid-traffic: connects are refused now
    for u in users:
        landed[u] = set()
    await eventually(lambda: all(landed.values()), what="every user served after the kill")
    n_after = len(victim.requests)
    for u in users:  # and some more rounds
        landed[u] = set()
    await eventually(lambda: all(landed.values()), what="every user served again")
    stop.set()
    await asyncio.gather(*tasks)

    assert failures == []
    assert len(victim.requests) == n_after  # nothing reached the dead backend later
    for u in users:
        pref = p.pref(u)
        assert before[u] == {pref[0]}
        if pref[0] == victim.id:
            assert landed[u] == {pref[1]}, u  # its fallback: next on its preference list
        else:
            assert landed[u] == {pref[0]}, u  # users of other backends do not move
    moved = [u for u in users if p.pref(u)[0] == victim.id]
    assert moved, "the victim owned none of the users: the test proves nothing"
    for b in bs:
        if b is victim:
            continue
        for rec in b.requests[-20:]:
            key = rec.one("X-Sticky-Key")
            expected = "failover" if p.pref(key)[0] == victim.id else "primary"
            assert rec.one("X-Sticky-Route") == expected


async def test_two_proxies_fail_over_to_the_same_backend(backends, proxy):
    bs = await backends("a", "b", "c")
    dead = DeadBackend("d")
    p1 = await proxy(bs + [dead], name="one.toml")
    p2 = await proxy(bs + [dead], name="two.toml")
    users = keys_where(p1, lambda pref: pref[0] == "d", n=25)
    for u in users:
        r1 = await p1.get("/", user=u)
        r2 = await p2.get("/", user=u)
        assert r1.status == r2.status == 200
        assert r1.one("X-Backend") == r2.one("X-Backend") == p1.pref(u)[1]


async def test_refused_connect_sends_even_a_post_to_the_next_backend(backends, proxy):
    (good,) = await backends("good")
    dead = DeadBackend("dead")
    p = await proxy([good, dead])
    (u,) = keys_where(p, lambda pref: pref[0] == "dead")
    r = await p.get("/order", user=u, method="POST", body=b"buy 1")
    assert r.status == 200 and r.body == b"buy 1"
    (rec,) = good.requests
    assert rec.method == "POST" and rec.body == b"buy 1"
    assert rec.one("X-Sticky-Route") == "failover"
    assert rec.one("X-Sticky-Backend") == "good"


async def test_reset_after_request_sent_retries_get_but_not_post(raw_backend, backends, proxy):
    (good,) = await backends("good")
    bad = await raw_backend("bad", _close_after_request)
    p = await proxy([good, bad])
    (u,) = keys_where(p, lambda pref: pref[0] == "bad")

    r = await p.get("/read", user=u)
    assert r.status == 200
    assert [rec.target for rec in good.requests] == ["/read"]
    assert good.requests[0].one("X-Sticky-Route") == "failover"
    assert [rec.target for rec in bad.requests] == ["/read"]

    r = await p.get("/write", user=u, method="POST", body=b"x=1")
    assert r.status == 502
    assert b"bad" in r.body
    assert [rec.target for rec in good.requests] == ["/read"]  # not retried
    assert [rec.target for rec in bad.requests] == ["/read", "/write"]


async def test_no_response_in_time_504_for_post_retry_for_get(raw_backend, backends, proxy):
    (good,) = await backends("good")
    slow = await raw_backend("slow", _hang)
    p = await proxy([good, slow], {"timeouts": {"response": "300ms"}})
    (u,) = keys_where(p, lambda pref: pref[0] == "slow")

    t0 = time.monotonic()
    r = await p.get("/write", user=u, method="POST", body=b"x")
    took = time.monotonic() - t0
    assert r.status == 504
    assert 0.3 <= took < 0.3 + 0.1 + 0.5
    assert good.requests == []

    t0 = time.monotonic()
    r = await p.get("/read", user=u)
    assert r.status == 200
    assert time.monotonic() - t0 < 0.3 + 0.1 + 0.5
    assert [rec.target for rec in good.requests] == ["/read"]
    assert good.requests[0].one("X-Sticky-Route") == "failover"
    assert [rec.target for rec in slow.requests] == ["/write", "/read"]


async def test_every_backend_refusing_gives_an_error_not_a_hang(proxy):
    p = await proxy([DeadBackend("a"), DeadBackend("b")])
    t0 = time.monotonic()
    r = await p.get("/", user="u")
    assert time.monotonic() - t0 < 2
    assert r.status in (502, 503)
    assert r.body.startswith(f"{r.status} ".encode())


async def test_no_usable_backend_gives_503_with_retry_after(proxy):
    p = await proxy([DeadBackend("a"), DeadBackend("b")], {"passive": {"connect_down": "30s"}})
    first = await p.get("/", user="u")  # discovers that both refuse connects
    assert first.status in (502, 503)
    r = await p.get("/", user="u")  # now no backend is usable
    assert r.status == 503
    assert r.one("Retry-After").isdigit()


async def test_all_backends_drained_gives_503_with_retry_after(backends, proxy):
    a, b = await backends("a", "b")
    p = await proxy([a, b], {"admin": {"enabled": True, "port": 0}})
    async with aiohttp.ClientSession() as s:
        for bid in ("a", "b"):
            async with s.post(f"http://127.0.0.1:{p.svc.admin.port}/backends/{bid}/drain") as r:
                assert r.status == 200
    r = await p.get("/", user="u")
    assert r.status == 503
    assert r.one("Retry-After") == "1"
    assert a.requests == [] and b.requests == []


async def test_backend_dying_mid_response_aborts_the_client(raw_backend, proxy):
    async def script(conn):
        await conn.request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await conn.drain()
        conn.close()

    be = await raw_backend("a", script)
    p = await proxy([be])
    c = await p.client()
    c.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
    with pytest.raises(IncompleteResponse):
        await c.response()
    assert c.eof  # the proxy closed the client connection


async def test_backend_dying_mid_chunked_response_aborts_the_client(raw_backend, proxy):
    async def script(conn):
        await conn.request()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await conn.drain()
        conn.close()

    be = await raw_backend("a", script)
    p = await proxy([be])
    c = await p.client()
    c.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
    with pytest.raises(IncompleteResponse):
        await c.response()


async def test_refused_backend_is_skipped_for_connect_down(raw_backend, backends, proxy):
    (good,) = await backends("good")
    dead = DeadBackend("flaky")
    p = await proxy([good, dead], {"passive": {"connect_down": "600ms"}})
    (u,) = keys_where(p, lambda pref: pref[0] == "flaky")

    t_fail = time.monotonic()
    assert (await p.get("/1", user=u)).status == 200  # refused → failover
    # the backend comes back on the same port at once...
    revived = await raw_backend("flaky", respond_with(OK), port=dead.port)
    r = await p.get("/2", user=u)
    assert r.status == 200 and r.body != b"ok"
    assert revived.connections == []  # ...but is not even tried for connect_down
    assert [rec.target for rec in good.requests] == ["/1", "/2"]

    # after connect_down it is the user's backend again
    async def back_on_owner():
        return (await p.get("/3", user=u)).body == b"ok"

    await eventually(back_on_owner, deadline=3, interval=0.05, what="owner used again")
    assert time.monotonic() - t_fail >= 0.6
    assert revived.requests and revived.requests[0].one("X-Sticky-Route") == "primary"


def _ids_where_client_ip_fallback_is_not_alphabetical() -> list[str]:
    """127.0.0.1's preference list over backend ids chosen so that its fallback (second) is
    not the alphabetically first survivor: only then do the two orders differ."""
    for n in range(200):
        pref = Ring([Member(f"n{n}-{c}") for c in "xyz"]).preference("127.0.0.1")
        if pref[1] > pref[2]:
            return pref
    raise AssertionError("no such id set")


async def test_client_ip_routing_fails_over_along_the_ip_preference_list(backends, proxy):
    pref = _ids_where_client_ip_fallback_is_not_alphabetical()
    live = await backends(pref[1], pref[2])
    p = await proxy(live + [DeadBackend(pref[0])], {"routing": {"no_key": "client-ip"}})
    assert p.pref("127.0.0.1") == pref
    first = await p.get("/")  # the owner refuses: retried
    second = await p.get("/")  # the owner is now known down: routed
    assert second.one("X-Backend") == pref[1]
    assert first.one("X-Backend") == pref[1]


class Blackhole:
    """A listener whose accept backlog is full: connects to it neither succeed nor fail
    (the SYN is dropped), so only the proxy's connect timeout ends them."""

    def __init__(self, bid: str):
        self.id = bid
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(c)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


@pytest.fixture
def blackhole():
    made = []

    def make(bid: str) -> Blackhole:
        b = Blackhole(bid)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


async def test_connect_timeout_fails_over_even_for_post(backends, blackhole, proxy):
    (good,) = await backends("good")
    hole = blackhole("hole")
    p = await proxy([good, hole], {"timeouts": {"connect": "300ms"}})
    (u,) = keys_where(p, lambda pref: pref[0] == "hole")
    t0 = time.monotonic()
    r = await p.get("/pay", user=u, method="POST", body=b"once")
    took = time.monotonic() - t0
    assert r.status == 200 and r.body == b"once"
    assert 0.3 <= took < 0.3 + 0.7, took
    assert good.requests[0].one("X-Sticky-Route") == "failover"
    t0 = time.monotonic()  # now skipped: no second connect timeout
    assert (await p.get("/again", user=u)).status == 200
    assert time.monotonic() - t0 < 0.25


async def test_retry_budget_and_inflight_counts_are_given_back(raw_backend, backends, proxy):
    (good,) = await backends("good")
    bad = await raw_backend("bad", _close_after_request)
    p = await proxy(
        [good, bad],
        {
            "admin": {"enabled": True, "port": 0},
            "passive": {"enabled": False},
            "retries": {"budget_min": 2, "budget_percent": 0},
        },
    )
    (u,) = keys_where(p, lambda pref: pref[0] == "bad")
    for i in range(8):  # 4× the budget, one at a time
        r = await p.get(f"/{i}", user=u)
        assert r.status == 200, (i, r.body)
    assert len(good.requests) == 8
    admin = f"http://127.0.0.1:{p.svc.admin.port}/backends"
    async with aiohttp.ClientSession() as s, s.get(admin) as resp:
        view = (await resp.json())["backends"]
    assert {b["id"]: b["inflight"] for b in view} == {"good": 0, "bad": 0}
