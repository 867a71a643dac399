"""The shop's token revocation (login, logout, logout-everywhere) and its guarded price cache,
in both modes, against a redis-server and a pricing origin of the test's own: what each
guarantees, what survives a user's move to another instance, what a Redis or origin outage
leaves working, and the reasons bad input gets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from shop.origin import BOOK_KEY, PriceBook, create_origin_app
from shop.prices import BREAKER_FAILURES, price_of
from shop.settings import (
    DEFAULT_TOKEN_LIFETIME,
    DEMO_TOKEN_SECRET,
    Settings,
    parse_args,
)

from support.net import IO_TIMEOUT, eventually

from .conftest import as_user
from .test_shop import MODES, metric

# The test origin's delay per lookup: long enough that concurrent misses overlap.
ORIGIN_DELAY = 0.2


@dataclass
class Origin:
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))

    @property
    def book(self) -> PriceBook:
        return self.server.app[BOOK_KEY]

    async def stop(self) -> None:
        await self.server.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = TestServer(create_origin_app(ORIGIN_DELAY), host="127.0.0.1")
    await server.start_server()
    try:
        yield Origin(server)
    finally:
        await server.close()


def bearer(token: str, user: str) -> dict[str, str]:
    return {**as_user(user), "Authorization": f"Bearer {token}"}


async def login(client, user: str) -> str:
    r = await client.post("/login", headers=as_user(user))
    assert r.status == 200
    body = await r.json()
    assert body["user"] == user and body["exp"] > time.time()
    return body["token"]


def assert_revoked(r) -> None:
    assert r.status == 401, r.status
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


# -- revocation -----------------------------------------------------------------------------


@pytest.mark.parametrize("stateless", MODES)
async def test_logout_revokes_the_token_everywhere_in_the_shop(shop, stateless):
    c = await shop(stateless=stateless)
    token = await login(c, "alice")
    auth = bearer(token, "alice")
    assert (await c.get("/counter", headers=auth)).status == 200
    r = await c.post("/logout", headers=auth)
    assert r.status == 200 and (await r.json())["revoked"] is True
    for method, path in (
        ("GET", "/counter"),
        ("POST", "/cart/items"),
        ("POST", "/jobs"),
        ("GET", "/prices/tea"),
        ("POST", "/logout"),
    ):
        r = await c.request(method, path, headers=auth, json={"item": "tea"})
        assert_revoked(r)
        assert "token revoked" in await r.text(), path
    fresh = await login(c, "alice")
    assert (await c.get("/counter", headers=bearer(fresh, "alice"))).status == 200
    # a token-less request is the routed user's (the demo's choice, see tokens.py)
    assert (await c.get("/counter", headers=as_user("alice"))).status == 200


@pytest.mark.parametrize("stateless", MODES)
async def test_logout_everywhere_revokes_every_earlier_token_only(shop, stateless):
    c = await shop(stateless=stateless)
    first, second = await login(c, "bob"), await login(c, "bob")
    other = await login(c, "carol")
    r = await c.post("/logout-everywhere", headers=bearer(first, "bob"))
    assert r.status == 200 and (await r.json())["revoked_before"] <= time.time()
    for token in (first, second):
        r = await c.get("/cart", headers=bearer(token, "bob"))
        assert_revoked(r)
        assert "issued before" in await r.text()
    # a token issued right after, in the same second, is not covered (fractional iat)
    after = await login(c, "bob")
    assert (await c.get("/cart", headers=bearer(after, "bob"))).status == 200
    assert (await c.get("/cart", headers=bearer(other, "carol"))).status == 200


async def test_sticky_revocation_check_costs_no_redis_command(shop, redis_server):
    c = await shop()
    token = await login(c, "alice")
    auth = bearer(token, "alice")
    assert (await c.get("/counter", headers=auth)).status == 200
    job = await (await c.post("/jobs", headers=auth)).json()
    before = redis_server.commandstats()
    # checked on the loaded context (/counter) and through the store (/jobs/{id}): memory only
    for _ in range(10):
        assert (await c.get("/counter", headers=auth)).status == 200
        assert (await c.get(f"/jobs/{job['id']}", headers=auth)).status == 200
    assert redis_server.calls_since(before) == {}
    assert await metric(c, "stickyctx_revocation_checks_total", outcome="ok") == 22
    before = redis_server.commandstats()
    assert (await c.post("/logout", headers=auth)).status == 200
    calls = redis_server.calls_since(before)
    assert calls.pop("evalsha") == 1  # the fenced write; the commands inside it are counted too
    assert set(calls) <= {"hmget", "hset", "pexpire"}


async def test_stateless_revocation_check_costs_a_round_trip_per_request(shop, redis_server):
    c = await shop(stateless=True, rate_limit=0)
    token = await login(c, "alice")
    auth = bearer(token, "alice")
    before = redis_server.commandstats()
    assert (await c.get("/counter", headers=auth)).status == 200
    assert redis_server.calls_since(before) == {
        "exists": 1,
        "get": 2,
    }  # revocation: EXISTS + GET; counter: GET
    before = redis_server.commandstats()
    assert (await c.post("/logout", headers=auth)).status == 200
    assert redis_server.calls_since(before) == {"exists": 1, "get": 1, "set": 1}


@pytest.mark.parametrize("stateless", MODES)
async def test_a_revoked_token_stays_revoked_after_the_user_moves(shop, stateless):
    a, b = await shop("app-1", stateless=stateless), await shop("app-2", stateless=stateless)
    token = await login(a, "alice")
    auth = bearer(token, "alice")
    assert (await a.get("/counter", headers=auth)).status == 200
    assert (await a.post("/logout", headers=auth)).status == 200
    await a.close()  # app-1 fails; the proxy sends alice to app-2
    for path in ("/counter", "/prices/apple"):
        r = await b.get(path, headers=auth)
        assert r.headers["X-Served-By"] == "app-2"
        assert_revoked(r)
    if not stateless:
        assert await metric(b, "stickyctx_revocation_checks_total", outcome="revoked") == 2


async def test_a_revocation_made_after_a_move_holds_when_the_user_moves_back(shop):
    """app-2 takes alice over and revokes her token there; once app-1 has been told of the
    takeover (within the listener's 1 s bound) it re-reads alice and refuses the token too."""
    a, b = await shop("app-1"), await shop("app-2")
    token = await login(a, "alice")
    auth = bearer(token, "alice")
    assert (await a.get("/counter", headers=auth)).status == 200
    assert (await b.post("/logout", headers=auth)).status == 200

    async def a_dropped_alice():
        return await metric(a, "stickyctx_entries") == 0

    await eventually(a_dropped_alice, what="app-1 told that app-2 took alice over")
    assert_revoked(await a.get("/counter", headers=auth))
    assert_revoked(await a.post("/jobs", headers=auth))


@pytest.mark.parametrize("stateless", MODES)
async def test_bad_tokens_get_401_with_a_reason(shop, stateless):
    c = await shop(stateless=stateless)
    now = time.time()
    claims = {"sub": "alice", "jti": "j1", "iat": now, "exp": now + 60}

    def token(secret: str = DEMO_TOKEN_SECRET, **changes) -> str:
        body = {k: v for k, v in {**claims, **changes}.items() if v is not None}
        return jwt.encode(body, secret, algorithm="HS256")

    cases = [
        ("Bearer not-a-jwt", "malformed token"),
        ("Bearer a.b.c", "malformed token"),
        ("Basic YWxpY2U6cHc=", "Bearer <token>"),
        ("Bearer", "Bearer <token>"),
        ("Bearer " + token("another-secret-of-at-least-thirty-two-bytes"), "signature"),
        ("Bearer " + token(iat=now - 120, exp=now - 60), "expired"),
        ("Bearer " + token(iat=now - 120, exp=now - 0.5), "expired"),  # no leeway past exp
        (
            "Bearer " + token(exp=now + 2 * DEFAULT_TOKEN_LIFETIME),
            "lives longer",
        ),  # could not be revoked
        ("Bearer " + token(iat=True), "NumericDate"),
        ("Bearer " + token(sub="mallory"), "another user"),
        ("Bearer " + token(jti=None), "'jti'"),
        ("Bearer " + token(iat=None), "'iat'"),
        ("Bearer " + token(jti=""), "jti"),
    ]
    for value, reason in cases:
        r = await c.get("/counter", headers={**as_user("alice"), "Authorization": value})
        assert r.status == 401, value
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"], value
        assert reason in await r.text(), (value, await r.text())
    for path in ("/logout", "/logout-everywhere"):
        r = await c.post(path, headers=as_user("alice"))
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert "no token" in await r.text()
    assert (await c.post("/login")).status == 400  # no user key: nobody to log in


async def test_sticky_redis_outage_logout_fails_and_checks_fail_closed(shop, redis_server, origin):
    """Redis down: a logout is not acknowledged (503), and once the stale-read window has
    passed a token cannot be checked, so requests bearing one get 503, never a pass."""
    c = await shop(price_origin=origin.url)
    token = await login(c, "alice")
    auth = bearer(token, "alice")
    assert (await c.get("/prices/apple", headers=auth)).status == 200
    redis_server.stop()

    async def fails_closed():
        r = await c.get("/prices/apple", headers=auth)
        return r.status == 503 and "revocations cannot be checked" in await r.text()

    await eventually(fails_closed, deadline=IO_TIMEOUT, interval=0.1, what="token checks refused")
    async with asyncio.timeout(IO_TIMEOUT):
        r = await c.post("/logout", headers=auth)
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert await metric(c, "stickyctx_revocation_checks_total", outcome="unavailable") >= 1


async def test_stateless_redis_outage_checks_fail_closed(shop, redis_server):
    c = await shop(stateless=True, rate_limit=0)
    token = await login(c, "alice")
    redis_server.stop()
    async with asyncio.timeout(IO_TIMEOUT):
        r = await c.get("/prices/apple", headers=bearer(token, "alice"))
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        r = await c.post("/logout", headers=bearer(token, "alice"))
        assert r.status == 503


# -- the guarded price cache ------------------------------------------------------------------


@pytest.mark.parametrize("stateless", MODES)
async def test_a_price_is_loaded_once_then_cached(shop, origin, stateless):
    c = await shop(stateless=stateless, price_origin=origin.url)
    for _ in range(3):
        r = await c.get("/prices/apple", headers=as_user("alice"))
        assert r.status == 200
        assert await r.json() == {"item": "apple", "price": price_of("alice", "apple")}
    assert origin.book.lookups == 1
    r = await c.delete("/prices", headers=as_user("alice"))
    assert await r.json() == {"forgotten": 1}
    assert (await c.get("/prices/apple", headers=as_user("alice"))).status == 200
    assert origin.book.lookups == 2


async def test_sticky_price_hit_costs_no_network_call(shop, origin, redis_server):
    c = await shop(price_origin=origin.url)
    assert (await c.get("/prices/milk", headers=as_user("alice"))).status == 200
    before, loads = redis_server.commandstats(), origin.book.lookups
    for _ in range(20):
        assert (await c.get("/prices/milk", headers=as_user("alice"))).status == 200
    assert redis_server.calls_since(before) == {}
    assert origin.book.lookups == loads


async def test_stateless_price_hit_costs_a_redis_command(shop, origin, redis_server):
    c = await shop(stateless=True, rate_limit=0, price_origin=origin.url)
    assert (await c.get("/prices/milk", headers=as_user("alice"))).status == 200
    before = redis_server.commandstats()
    assert (await c.get("/prices/milk", headers=as_user("alice"))).status == 200
    assert redis_server.calls_since(before) == {"hget": 1}


@pytest.mark.parametrize("stateless", MODES)
async def test_concurrent_misses(shop, origin, stateless):
    """Sticky: 20 concurrent misses of one price are one origin load. Stateless: each request
    that misses Redis loads it (the cold-start flood the guarded cache prevents)."""
    c = await shop(stateless=stateless, price_origin=origin.url)
    async with asyncio.timeout(IO_TIMEOUT):
        replies = await asyncio.gather(
            *(c.get("/prices/tea", headers=as_user("alice")) for _ in range(20))
        )
    assert [r.status for r in replies] == [200] * 20
    if stateless:
        assert origin.book.lookups > 1
    else:
        assert origin.book.lookups == 1
        assert await metric(c, "stickyctx_cache_lookups_total", outcome="coalesced") == 19


async def test_sticky_origin_outage_serves_cached_prices_and_opens_the_breaker(shop, origin):
    c = await shop(price_origin=origin.url)
    assert (await c.get("/prices/apple", headers=as_user("alice"))).status == 200
    await origin.stop()
    async with asyncio.timeout(IO_TIMEOUT):
        for i in range(3 * BREAKER_FAILURES):
            r = await c.get("/prices/apple", headers=as_user("alice"))
            assert r.status == 200 and (await r.json())["price"] == price_of("alice", "apple")
            r = await c.get("/prices/tea", headers=as_user(f"user-{i}"))
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            assert "pricing unavailable" in (await r.json())["error"]
    # only the first BREAKER_FAILURES loads reached for the origin; then the breaker held them off
    assert (
        await metric(c, "stickyctx_cache_origin_loads_total", outcome="error") == BREAKER_FAILURES
    )
    assert (
        await metric(c, "stickyctx_cache_lookups_total", outcome="unavailable")
        == 3 * BREAKER_FAILURES
    )
    assert await metric(c, "stickyctx_cache_breaker_state") != 0


async def test_stateless_origin_outage_serves_what_redis_holds(shop, origin):
    c = await shop(stateless=True, price_origin=origin.url)
    assert (await c.get("/prices/apple", headers=as_user("alice"))).status == 200
    await origin.stop()
    async with asyncio.timeout(IO_TIMEOUT):
        assert (await c.get("/prices/apple", headers=as_user("alice"))).status == 200
        r = await c.get("/prices/tea", headers=as_user("alice"))
    assert r.status == 503 and "pricing unavailable" in (await r.json())["error"]


async def test_a_user_moving_back_never_sees_a_price_from_before_the_move(shop, origin):
    """alice's price is cached on app-1; it changes at the origin while she is served by
    app-2; back on app-1 (within the entry's 30 s ttl) she gets the new price, not the
    entry from before her move: the entry belonged to an older ownership epoch."""
    a, b = (
        await shop("app-1", price_origin=origin.url),
        await shop("app-2", price_origin=origin.url),
    )
    alice = as_user("alice")
    old = (await (await a.get("/prices/apple", headers=alice)).json())["price"]
    # reprice alice's apples at the origin
    async with (
        aiohttp.ClientSession() as http,
        http.put(origin.server.make_url("/prices/alice/apple"), json={"price": old + 100}) as r,
    ):
        assert r.status == 200
    r = await b.get("/prices/apple", headers=alice)
    assert r.headers["X-Served-By"] == "app-2" and (await r.json())["price"] == old + 100

    async def a_dropped_alice():
        return await metric(a, "stickyctx_entries") == 0

    await eventually(a_dropped_alice, what="app-1 told that app-2 took alice over")
    r = await a.get("/prices/apple", headers=alice)
    assert (await r.json())["price"] == old + 100
    assert origin.book.lookups == 3


async def test_sticky_redis_outage_prices_keep_answering(shop, redis_server, origin):
    """Redis down: a cached price is still served (no Redis, no origin), and a price not
    cached is still loaded from the origin; only the user's context is out of reach."""
    c = await shop(price_origin=origin.url)
    alice = as_user("alice")
    assert (await c.get("/prices/apple", headers=alice)).status == 200
    redis_server.stop()

    async def context_unavailable():
        return (await c.get("/counter", headers=alice)).status == 503

    await eventually(
        context_unavailable, deadline=IO_TIMEOUT, interval=0.1, what="context store 503"
    )
    loads = origin.book.lookups
    async with asyncio.timeout(IO_TIMEOUT):
        for _ in range(5):
            r = await c.get("/prices/apple", headers=alice)
            assert r.status == 200 and (await r.json())["price"] == price_of("alice", "apple")
        assert origin.book.lookups == loads
        r = await c.get("/prices/tea", headers=alice)
        assert r.status == 200 and origin.book.lookups == loads + 1
        r = await c.get("/prices/tea", headers=as_user("newcomer"))
        assert r.status == 200


async def test_stateless_redis_outage_sends_every_lookup_to_the_origin(shop, redis_server, origin):
    c = await shop(stateless=True, rate_limit=0, price_origin=origin.url)
    alice = as_user("alice")
    assert (await c.get("/prices/apple", headers=alice)).status == 200
    redis_server.stop()
    loads = origin.book.lookups
    async with asyncio.timeout(IO_TIMEOUT):
        for _ in range(3):
            assert (await c.get("/prices/apple", headers=alice)).status == 200
    assert origin.book.lookups == loads + 3


@pytest.mark.parametrize("stateless", MODES)
async def test_price_lookups_refuse_unknown_products(shop, stateless):
    c = await shop(stateless=stateless)
    r = await c.get("/prices/caviar", headers=as_user("alice"))
    assert r.status == 404 and "unknown product" in (await r.json())["error"]
    assert (await c.get("/prices/tea")).status == 400


def test_settings_name_every_bad_option():
    with pytest.raises(ValueError) as e:
        Settings(
            port=0,
            node_id="a",
            redis_url="redis://x",
            price_origin="ftp://origin",
            price_delay=-1,
            price_ttl=0,
            token_secret="short",
            token_lifetime=0,
        )
    for option in (
        "--price-origin",
        "--price-delay",
        "--price-ttl",
        "--token-secret",
        "--token-lifetime",
    ):
        assert option in str(e.value)
    with pytest.raises(ValueError, match="idle TTL"):
        Settings(port=0, node_id="a", redis_url="redis://x", token_lifetime=10 * 86_400)
    assert (
        Settings(port=0, node_id="a", redis_url="redis://x").token_lifetime
        == DEFAULT_TOKEN_LIFETIME
    )


def test_command_line_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(
            ["--port", "1", "--node-id", "a", "--redis", "redis://x", "--price-origin", "nope"]
        )
    assert e.value.code == 2
    assert "--price-origin: not an http(s) URL: 'nope'" in capsys.readouterr().err
