"""Sticky routing and the proxy ↔ backend contract (DESIGN.md P1, P5, §4).

Every request here goes through a real proxy to real aiohttp backends; what the backend
received is what is asserted.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from support.config import ring_of, route_json
from support.http import http_request

USERS = [f"user-{i}" for i in range(150)]


async def test_running_loop_is_uvloop():
    """Guard for the harness itself: the proxy under test runs on uvloop."""
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_users_land_on_their_ring_owner_every_time(backends, proxy):
    bs = await backends("app-a", "app-b", "app-c")
    p = await proxy(bs)
    prefs = route_json(p.path, *USERS)  # what `stickyproxy route --json` says
    async with aiohttp.ClientSession() as s:
        for rnd in range(2):
            for u in USERS:
                async with s.get(
                    f"http://127.0.0.1:{p.port}/r{rnd}", headers={"X-User-Id": u}
                ) as r:
                    assert r.status == 200
                    await r.read()
    seen: dict[str, set[str]] = {}
    for b in bs:
        for rec in b.requests:
            key = rec.one("X-Sticky-Key")
            assert rec.one("X-Sticky-Backend") == b.id
            assert rec.one("X-Sticky-Route") == "primary"
            assert rec.one("X-Sticky-Ring") == p.fingerprint
            seen.setdefault(key, set()).add(b.id)
    assert sorted(seen) == sorted(USERS)
    for u in USERS:
        assert seen[u] == {prefs[u][0]}, u
        assert prefs[u] == p.pref(u)  # the CLI and the in-process ring agree
    # every backend owns some of 150 users
    assert all(b.requests for b in bs)


async def test_client_sent_sticky_headers_are_removed(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    r = await p.exchange(
        http_request(
            "GET",
            "/",
            headers=[
                ("X-User-Id", "alice"),
                ("X-Sticky-Key", "mallory"),
                ("x-sticky-backend", "evil"),
                ("X-STICKY-ROUTE", "failover"),
                ("X-Sticky-Ring", "0000"),
                ("x-StIcKy-Extra", "1"),
            ],
        )
    )
    assert r.status == 200
    (rec,) = a.requests
    assert rec.one("X-Sticky-Key") == "alice"
    assert rec.one("X-Sticky-Backend") == "a"
    assert rec.one("X-Sticky-Route") == "primary"
    assert rec.one("X-Sticky-Ring") == p.fingerprint
    assert not rec.has("X-Sticky-Extra")
    assert not any(v in ("mallory", "evil", "0000") for _, v in rec.headers)


@pytest.mark.parametrize(
    "how, request_bytes",
    [
        pytest.param(
            "header", http_request("GET", "/x", headers={"X-User-Id": "k-header"}), id="header"
        ),
        pytest.param(
            "cookie",
            http_request("GET", "/x", headers={"Cookie": "a=1; uid=k-cookie; b=2"}),
            id="cookie",
        ),
        pytest.param("query", http_request("GET", "/x?foo=1&user=k-query"), id="query"),
        pytest.param("path", http_request("GET", "/u/k-path/profile"), id="path"),
    ],
)
async def test_key_sources(backends, proxy, how, request_bytes):
    bs = await backends("a", "b", "c")
    p = await proxy(
        bs,
        {
            "routing": {
                "keys": [
                    {"from": "header", "name": "X-User-Id"},
                    {"from": "cookie", "name": "uid"},
                    {"from": "query", "name": "user"},
                    {"from": "path", "pattern": "^/u/(?P<key>[^/]+)"},
                ],
                "no_key": "reject",
            }
        },
    )
    r = await p.exchange(request_bytes)
    assert r.status == 200, r.body
    key = f"k-{how}"
    (rec,) = [rec for b in bs for rec in b.requests]
    assert rec.one("X-Sticky-Key") == key
    assert rec.backend == p.pref(key)[0]


async def test_repeated_key_header_with_different_values_is_refused(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    c = await p.client()
    c.send(http_request("GET", "/", headers=[("X-User-Id", "alice"), ("X-User-Id", "bob")]))
    r = await c.response()
    assert r.status == 400
    assert b"different values" in r.body
    assert await c.closed()
    # identical repeats are not ambiguous
    r = await p.exchange(
        http_request("GET", "/", headers=[("X-User-Id", "al"), ("X-User-Id", "al")])
    )
    assert r.status == 200
    assert len(a.requests) == 1 and a.requests[0].target == "/"


async def test_no_key_reject(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a], {"routing": {"no_key": "reject"}})
    r = await p.get("/")
    assert r.status == 400
    assert b"no user key" in r.body
    assert a.requests == []
    assert (await p.get("/", user="u1")).status == 200


async def test_no_key_round_robin_spreads(backends, proxy):
    bs = await backends("a", "b", "c")
    p = await proxy(bs, {"routing": {"no_key": "round-robin"}})
    for _ in range(30):
        assert (await p.get("/")).status == 200
    counts = Counter(rec.backend for b in bs for rec in b.requests)
    assert counts == {"a": 10, "b": 10, "c": 10}
    for b in bs:
        for rec in b.requests:
            assert not rec.has("X-Sticky-Key")
            assert rec.one("X-Sticky-Backend") == b.id


async def test_no_key_client_ip_is_sticky(backends, proxy):
    bs = await backends("a", "b", "c")
    p = await proxy(bs, {"routing": {"no_key": "client-ip"}})
    for _ in range(12):
        assert (await p.get("/")).status == 200
    owner = p.pref("127.0.0.1")[0]
    assert {rec.backend for b in bs for rec in b.requests} == {owner}


async def test_pipelined_keyless_requests_are_each_routed_by_their_own_client(backends, proxy):
    """Two keyless requests from a trusted proxy in one read, for two different clients:
    each goes to its own address's owner (the second's X-Forwarded-For must not reach the
    first's routing decision)."""
    bs = await backends("a", "b", "c")
    p = await proxy(
        bs, {"routing": {"no_key": "client-ip"}, "listen": {"trusted_proxies": ["127.0.0.1"]}}
    )
    ips = [f"203.0.113.{i}" for i in range(1, 255)]
    first = ips[0]
    second = next(ip for ip in ips if p.pref(ip)[0] != p.pref(first)[0])
    c = await p.client()
    c.send(
        http_request("GET", "/1", headers={"X-Forwarded-For": first})
        + http_request("GET", "/2", headers={"X-Forwarded-For": second})
    )
    for _ in range(2):
        assert (await c.response()).status == 200
    c.close()
    got = {rec.target: rec.backend for b in bs for rec in b.requests}
    assert got == {"/1": p.pref(first)[0], "/2": p.pref(second)[0]}


async def test_x_forwarded_from_untrusted_peer_is_replaced(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    r = await p.exchange(
        http_request(
            "GET",
            "/",
            host="shop.example:8443",
            headers=[
                ("X-User-Id", "u"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "evil.example"),
                ("Forwarded", "for=6.6.6.6"),
            ],
        )
    )
    assert r.status == 200
    (rec,) = a.requests
    assert rec.one("X-Forwarded-For") == "127.0.0.1"
    assert rec.one("X-Forwarded-Proto") == "http"
    assert rec.one("X-Forwarded-Host") == "shop.example:8443"
    assert not rec.has("Forwarded")
    assert rec.one("Host") == "shop.example:8443"


async def test_x_forwarded_for_from_trusted_proxy_is_kept_and_extended(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a], {"listen": {"trusted_proxies": ["127.0.0.1/32"]}})
    r = await p.exchange(
        http_request(
            "GET",
            "/",
            host="internal:80",
            headers=[
                ("X-User-Id", "u"),
                ("X-Forwarded-For", "203.0.113.7, 10.0.0.1"),
                ("X-Forwarded-For", "10.0.0.2"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "shop.example"),
            ],
        )
    )
    assert r.status == 200
    (rec,) = a.requests
    assert rec.one("X-Forwarded-For") == "203.0.113.7, 10.0.0.1, 10.0.0.2, 127.0.0.1"
    assert rec.one("X-Forwarded-Proto") == "https"
    assert rec.one("X-Forwarded-Host") == "shop.example"


async def test_forwarded_headers_can_be_switched_off(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a], {"headers": {"forwarded": False}})
    r = await p.exchange(
        http_request("GET", "/", headers={"X-User-Id": "u", "X-Forwarded-For": "6.6.6.6"})
    )
    assert r.status == 200
    (rec,) = a.requests
    # neither the proxy's own nor the client's (untrusted) copy
    assert not rec.has("X-Forwarded-For")
    assert not rec.has("X-Forwarded-Proto")


async def test_header_prefix_is_configurable(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a], {"headers": {"prefix": "X-Route-"}})
    r = await p.exchange(
        http_request("GET", "/", headers={"X-User-Id": "u", "X-Route-Key": "forged"})
    )
    assert r.status == 200
    (rec,) = a.requests
    assert rec.one("X-Route-Key") == "u"
    assert rec.one("X-Route-Backend") == "a"
    assert rec.one("X-Route-Ring") == ring_of(p.config).fingerprint
    assert not any(n.lower().startswith("x-sticky-") for n, _ in rec.headers)


async def test_strip_headers_are_never_forwarded(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a], {"headers": {"strip": ["X-Remote-User", "X-Internal-Role"]}})
    r = await p.exchange(
        http_request(
            "GET",
            "/",
            headers=[
                ("X-User-Id", "u"),
                ("x-remote-USER", "admin"),
                ("X-Internal-Role", "root"),
                ("X-Other", "kept"),
            ],
        )
    )
    assert r.status == 200
    (rec,) = a.requests
    assert not rec.has("X-Remote-User") and not rec.has("X-Internal-Role")
    assert rec.one("X-Other") == "kept"


async def test_jwt_claim_is_the_routing_key(backends, proxy, monkeypatch):
    import time as _time

    import jwt

    monkeypatch.setenv("SP_TEST_JWT_SECRET", "s3cret-for-tests-only-0123456789abcdef")
    bs = await backends("a", "b", "c")
    p = await proxy(
        bs,
        {
            "routing": {
                "keys": [
                    {
                        "from": "jwt",
                        "header": "Authorization",
                        "claim": "sub",
                        "algorithms": ["HS256"],
                        "secret_env": "SP_TEST_JWT_SECRET",
                    }
                ],
                "no_key": "reject",
            },
            "headers": {"strip": ["X-User-Id"]},
        },
    )

    def token(sub, secret="s3cret-for-tests-only-0123456789abcdef", exp=600):
        return jwt.encode({"sub": sub, "exp": int(_time.time()) + exp}, secret, "HS256")

    for u in [f"jwt-user-{i}" for i in range(20)]:
        r = await p.exchange(
            http_request(
                "GET", "/", headers={"Authorization": f"Bearer {token(u)}", "X-User-Id": "forged"}
            )
        )
        assert r.status == 200
        assert r.one("X-Backend") == p.pref(u)[0]
    for b in bs:
        for rec in b.requests:
            assert rec.one("X-Sticky-Key").startswith("jwt-user-")
            assert not rec.has("X-User-Id")
    served = sum(len(b.requests) for b in bs)
    for bad in (
        token("mallory", secret="not-the-secret-0123456789abcdef0123"),
        token("late", exp=-3600),
        "not.a.jwt",
    ):
        r = await p.exchange(http_request("GET", "/", headers={"Authorization": f"Bearer {bad}"}))
        assert r.status == 401, r.body
        assert r.get("WWW-Authenticate") is not None
    assert sum(len(b.requests) for b in bs) == served  # none of those was forwarded
