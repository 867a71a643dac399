"""Token revocation at the owner: the verdict rules (table-tested), bad input, one fenced write
per revocation and no Redis command per check, revocations surviving a move between two
stores on one real redis-server, expiry with the tokens, a Redis outage, and the aiohttp
(real server) and ASGI (Starlette through httpx) helpers."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from stickyproxy.context import (
    ConfigError,
    MalformedToken,
    RevocationMiddleware,
    Revocations,
    StickyContextMiddleware,
    StoreUnavailable,
    UnknownToken,
    context_middleware,
    get_context,
    revocation_middleware,
)
from stickyproxy.context.revocation import (
    MAX_REVOKED_TOKENS,
    REVOKED_FIELD,
    Revoked,
    TokenClaims,
    TooManyRevocations,
    token_claims,
    unverified_claims,
)

from .conftest import RedisServer, eventually

Stores = Callable[..., Any]
SECRET = "s3cret-for-tests-only-32-bytes!!"
HOUR = 3600.0


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def token(**claims: Any) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


# -- pure rules ----------------------------------------------------------------------------

NOW = 1000.0
LIST = Revoked({"a": 2000.0, "old": 900.0}, before=950.0, until=1500.0)


@pytest.mark.parametrize(
    ("claims", "now", "expected"),
    [
        (TokenClaims("a", 960.0, 2000.0), NOW, "token revoked"),
        (TokenClaims("b", 960.0, 2000.0), NOW, None),
        (TokenClaims("old", 960.0, 900.0), NOW, None),  # its revocation ended with it
        (
            TokenClaims("b", 940.0, 2000.0),
            NOW,
            "token issued before the user's tokens were revoked",
        ),
        (
            TokenClaims(None, None, 2000.0),
            NOW,
            "token issued before the user's tokens were revoked",
        ),
        (
            TokenClaims("b", 940.0, 2000.0),
            1600.0,
            None,
        ),  # the cut-off outlived every token it covered
        (TokenClaims("a", 960.0, 2000.0), 2000.0, None),
    ],
)
def test_verdict(claims: TokenClaims, now: float, expected: str | None) -> None:
    assert LIST.verdict(claims, now) == expected


def test_parse_drops_malformed_parts_and_prune_drops_ended_entries() -> None:
    raw = {"jti": {"a": 5, "b": "x", "c": True}, "before": [1, "y"]}
    assert Revoked.parse(raw) == Revoked({"a": 5.0})
    assert Revoked.parse("junk") == Revoked({})
    assert LIST.pruned(1000.0) == Revoked({"a": 2000.0}, 950.0, 1500.0)
    assert LIST.pruned(1600.0) == Revoked({"a": 2000.0})
    assert Revoked.parse(LIST.dump()) == LIST


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"jti": 7}, "jti must be a non-empty string"),
        ({"jti": ""}, "jti"),
        ({"jti": "x" * 257}, "jti"),
        ({"iat": "yesterday"}, "claim 'iat' must be a NumericDate"),
        ({"exp": True}, "claim 'exp'"),
        ({"exp": float("inf")}, "claim 'exp'"),
    ],
)
def test_malformed_claims(claims: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedToken, match=message):
        token_claims(claims)


def test_unverified_claims() -> None:
    assert unverified_claims("Bearer " + token(sub="u", jti="j")) == {"sub": "u", "jti": "j"}
    assert unverified_claims("Basic dXNlcjpwdw==") is None
    body = base64.urlsafe_b64encode(json.dumps([1]).encode()).decode().rstrip("=")
    for bad, message in [
        ("Bearer abc", "not a JWS compact"),
        ("Bearer a.!!!.c", "base64url"),
        (f"Bearer a.{body}.c", "not a JSON object"),
        ("Bearer " + "a" * 9000, "longer than"),
    ]:
        with pytest.raises(MalformedToken, match=message):
            unverified_claims(bad)


# -- bad configuration and input ----------------------------------------------------------


async def test_lifetime_must_fit_the_idle_ttl(stores: Stores) -> None:
    store = await stores("A", idle_ttl="1h")
    with pytest.raises(ConfigError, match="max_token_lifetime: 7200s exceeds the store's idle_ttl"):
        Revocations(store, max_token_lifetime="2h")
    for bad in (0, -5, "soon"):
        with pytest.raises(ConfigError, match="max_token_lifetime"):
            Revocations(store, max_token_lifetime=bad)


async def test_bad_revocations_are_clear_errors(stores: Stores) -> None:
    clock = Clock()
    revocations = Revocations(await stores("A"), max_token_lifetime="1h", clock=clock)
    with pytest.raises(UnknownToken, match="token 'nope' of user 'u' is not revoked"):
        await revocations.restore("u", "nope")
    with pytest.raises(MalformedToken, match="no jti claim"):
        await revocations.revoke_token("u", {"exp": clock.now + 60})
    with pytest.raises(MalformedToken, match="no exp claim"):
        await revocations.revoke_token("u", {"jti": "j"})
    with pytest.raises(MalformedToken, match="beyond max_token_lifetime"):
        await revocations.revoke("u", "j", clock.now + 2 * HOUR)
    with pytest.raises(ValueError, match="before must not be in the future"):
        await revocations.revoke_all("u", before=clock.now + 10)
    assert await revocations.revoke("u", "expired", clock.now - 1) is False
    context: dict[str, Any] = {}
    for i in range(MAX_REVOKED_TOKENS):
        revocations.revoke_in(context, f"t{i}", clock.now + 60)
    with pytest.raises(TooManyRevocations, match="revoke all of the user's tokens instead"):
        revocations.revoke_in(context, "one-more", clock.now + 60)
    # A full list is still judged by the token's own entry.
    assert revocations.verdict(context, {"jti": "t500", "exp": clock.now + 60}) == "token revoked"
    assert revocations.verdict(context, {"jti": "one-more", "exp": clock.now + 60}) is None


# -- through the store, one real redis-server ----------------------------------------------


async def test_one_write_per_revocation_and_none_per_check(
    stores: Stores, redis_server: RedisServer
) -> None:
    store = await stores("A")
    revocations = Revocations(store, max_token_lifetime="1h")
    exp = time.time() + 600
    await revocations.revoke("u", "warm-up", exp)  # loads the write script on the server
    before = redis_server.commandstats()
    assert await revocations.revoke("u", "j1", exp) is True
    assert redis_server.store_calls(before).get("evalsha") == 1
    before = redis_server.commandstats()
    for _ in range(100):
        assert await revocations.check("u", {"jti": "j1", "exp": exp}) == "token revoked"
        assert await revocations.check("u", {"jti": "j2", "exp": exp}) is None
    assert redis_server.store_calls(before) == {}


async def test_revocations_survive_a_move_both_ways(stores: Stores) -> None:
    a, b = await stores("A"), await stores("B")
    on_a = Revocations(a, max_token_lifetime="1h")
    on_b = Revocations(b, max_token_lifetime="1h")
    exp = time.time() + 600
    await on_a.revoke("u", "stolen", exp)
    # The user moves to B: B acquires the context and, with it, the revocation.
    assert (
        await on_b.check("u", {"jti": "stolen", "iat": time.time(), "exp": exp}) == "token revoked"
    )
    cut = await on_b.revoke_all("u")
    # And back to A, once A has dropped its copy on B's takeover.
    await eventually(lambda: not a.holds("u"))
    assert await on_a.check("u", {"jti": "stolen", "exp": exp}) == "token revoked"
    assert await on_a.check("u", {"jti": "other", "iat": cut - 5, "exp": exp}) is not None
    assert await on_a.check("u", {"jti": "fresh", "iat": cut + 1, "exp": exp}) is None


async def test_entries_expire_with_their_tokens(stores: Stores) -> None:
    clock = Clock(time.time())
    store = await stores("A")
    revocations = Revocations(store, max_token_lifetime="1h", clock=clock)
    await revocations.revoke("u", "short", clock.now + 60)
    await revocations.revoke_all("u", before=clock.now - 10)
    assert (
        await revocations.check("u", {"jti": "short", "iat": clock.now, "exp": clock.now + 60})
        == "token revoked"
    )
    clock.now += HOUR + 1
    assert (
        await revocations.check("u", {"jti": "short", "iat": clock.now - 20, "exp": clock.now + 60})
        is None
    )
    await revocations.revoke("u", "later", clock.now + 60)
    assert (await store.get("u"))[REVOKED_FIELD] == {"jti": {"later": clock.now + 60}}


async def test_restore_readmits_the_token(stores: Stores) -> None:
    revocations = Revocations(await stores("A"), max_token_lifetime="1h")
    exp = time.time() + 600
    await revocations.revoke("u", "j", exp)
    await revocations.restore("u", "j")
    assert await revocations.check("u", {"jti": "j", "exp": exp}) is None


async def test_redis_outage(stores: Stores, redis_server: RedisServer) -> None:
    store = await stores("A", listener_liveness="1s", redis_timeout="100ms")
    revocations = Revocations(store, max_token_lifetime="1h")
    exp = time.time() + 600
    await revocations.revoke("u", "j", exp)
    redis_server.kill()
    # Within the stale-read window the held context still answers from memory ...
    assert await revocations.check("u", {"jti": "j", "exp": exp}) == "token revoked"
    # ... a new revocation is not acknowledged (the caller must tell its user) ...
    with pytest.raises(StoreUnavailable):
        await revocations.revoke("u", "k", exp)

    # ... and once the window is over a check cannot be made: the helpers answer 503.
    async def unreadable() -> bool:
        try:
            await revocations.check("u", {"jti": "j", "exp": exp})
        except StoreUnavailable:
            return True
        return False

    await eventually(unreadable, deadline=5.0, interval=0.05)


# -- framework helpers ---------------------------------------------------------------------


async def test_aiohttp_middleware_rejects_revoked_and_malformed_tokens(stores: Stores) -> None:
    store = await stores("A")
    revocations = Revocations(store, max_token_lifetime="1h")
    exp = int(time.time()) + 600

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def logout(request: web.Request) -> web.Response:
        # Under the context middleware: revoke in the loaded context, saved with the response.
        claims = unverified_claims(request.headers["Authorization"])
        assert claims is not None
        revocations.revoke_in(get_context(request), claims["jti"], claims["exp"])
        return web.Response(text="bye")

    app = web.Application(
        middlewares=[context_middleware(store), revocation_middleware(revocations)]
    )
    app.router.add_get("/", hello)
    app.router.add_post("/logout", logout)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    mine = {
        "X-Sticky-Key": "alice",
        "Authorization": "Bearer " + token(sub="alice", jti="t1", exp=exp),
    }
    other = {
        "X-Sticky-Key": "alice",
        "Authorization": "Bearer " + token(sub="alice", jti="t2", exp=exp),
    }
    results = []
    try:
        async with ClientSession() as http:
            for method, path, headers in [
                ("GET", "/", mine),
                ("POST", "/logout", mine),
                ("GET", "/", mine),
                ("GET", "/", other),
                ("GET", "/", {"X-Sticky-Key": "alice", "Authorization": "Bearer x.y"}),
                ("GET", "/", {"X-Sticky-Key": "alice"}),
            ]:
                async with http.request(method, server.make_url(path), headers=headers) as r:
                    results.append((r.status, r.headers.get("WWW-Authenticate"), await r.text()))
    finally:
        await server.close()
    assert [s for s, _, _ in results] == [200, 200, 401, 200, 401, 200]
    assert results[2][1] == 'Bearer error="invalid_token", error_description="token revoked"'
    assert "malformed token: bearer token is not a JWS" in results[4][2]
    # The challenge carries a fixed phrase (RFC 6750 §3 error_description excludes '"'); details go in the body.
    assert results[4][1] == 'Bearer error="invalid_token", error_description="malformed token"'
    assert revocations.metrics.checks.labels("revoked")._value.get() == 1


async def test_aiohttp_middleware_alone_503_when_unreadable_unless_fail_open(
    stores: Stores, redis_server: RedisServer
) -> None:
    store = await stores("A", listener_liveness="100ms", redis_timeout="100ms")
    revocations = Revocations(store, max_token_lifetime="1h")
    exp = int(time.time()) + 600
    headers = {
        "X-Sticky-Key": "bob",
        "Authorization": "Bearer " + token(sub="bob", jti="t", exp=exp),
    }

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    statuses = {}
    redis_server.kill()
    await eventually(lambda: not store.listener_connected)
    for fail_open in (False, True):
        app = web.Application(middlewares=[revocation_middleware(revocations, fail_open=fail_open)])
        app.router.add_get("/", hello)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with (
                ClientSession() as http,
                http.get(server.make_url("/"), headers=headers) as r,
            ):
                statuses[fail_open] = (r.status, r.headers.get("Retry-After"))
        finally:
            await server.close()
    assert statuses == {False: (503, "1"), True: (200, None)}


async def test_asgi_middleware_rejects_revoked_tokens(stores: Stores) -> None:
    store = await stores("A")
    revocations = Revocations(store, max_token_lifetime="1h")
    exp = int(time.time()) + 600
    await revocations.revoke("carol", "gone", exp)

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = StickyContextMiddleware(
        RevocationMiddleware(Starlette(routes=[Route("/", hello)]), revocations), store
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        gone = await client.get(
            "/",
            headers={
                "X-Sticky-Key": "carol",
                "Authorization": "Bearer " + token(jti="gone", exp=exp),
            },
        )
        fine = await client.get(
            "/",
            headers={
                "X-Sticky-Key": "carol",
                "Authorization": "Bearer " + token(jti="ok", exp=exp),
            },
        )
    assert gone.status_code == 401 and "invalid_token" in gone.headers["www-authenticate"]
    assert fine.status_code == 200
