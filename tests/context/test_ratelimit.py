"""Per-user rate limits at the owner: bucket arithmetic (table-tested), bad limits, the bound
a move grants (two stores on one real redis-server), zero Redis commands per check, a Redis
outage, and the aiohttp (real server) and ASGI (Starlette through httpx) helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from stickyproxy.context import (
    ConfigError,
    Limit,
    RateLimiter,
    RateLimitMiddleware,
    StickyContextMiddleware,
    context_middleware,
    get_context,
    rate_limit_middleware,
)
from stickyproxy.context.ratelimit import (
    MATERIAL_SHARE,
    RATELIMIT_FIELD,
    estimate,
    material,
    parse_snapshot,
    refill,
    retry_after_seconds,
    take,
)

from .conftest import RedisServer, eventually

Stores = Callable[..., Any]
TEN = Limit(rate=1.0, burst=10)


class Clock:
    """A hand-moved clock serving as both the monotonic and the wall clock."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# -- pure arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "elapsed", "expected"),
    [(0.0, 0.0, 0.0), (0.0, 3.0, 3.0), (8.0, 5.0, 10.0), (4.0, -2.0, 4.0), (10.0, 100.0, 10.0)],
)
def test_refill(tokens: float, elapsed: float, expected: float) -> None:
    assert refill(tokens, elapsed, TEN) == expected


@pytest.mark.parametrize(
    ("tokens", "cost", "expected"),
    [
        (3.0, 1, (True, 2.0, 0.0)),
        (1.0, 1, (True, 0.0, 0.0)),
        (0.0, 1, (False, 0.0, 1.0)),
        (0.5, 1, (False, 0.5, 0.5)),
        (2.0, 4, (False, 2.0, 2.0)),
    ],
)
def test_take(tokens: float, cost: int, expected: tuple[bool, float, float]) -> None:
    assert take(tokens, cost, TEN) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([3, 10.5], (3.0, 10.5)),
        ([-1, 2], (0.0, 2.0)),
        (None, None),
        ([1], None),
        ("x", None),
        ([True, 1], None),
        ([1, float("nan")], None),
        ({"a": 1}, None),
    ],
)
def test_parse_snapshot(raw: Any, expected: Any) -> None:
    assert parse_snapshot(raw) == expected


def test_estimate_and_material() -> None:
    assert estimate(None, 50.0, TEN) == 10.0
    assert estimate((2.0, 40.0), 43.0, TEN) == 5.0
    assert estimate((50.0, 40.0), 40.0, TEN) == 10.0  # a snapshot never exceeds the burst
    assert not material(10.0, 5.5, TEN)
    assert material(10.0, 5.0, TEN)


@pytest.mark.parametrize(("wait", "header"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (59.5, 60)])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: int) -> None:
    assert retry_after_seconds(wait) == header


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"api": Limit(rate=0, burst=5)}, "limits['api'].rate: must be a positive number"),
        ({"api": Limit(rate=-1.0, burst=5)}, "limits['api'].rate"),
        ({"api": Limit(rate=float("nan"), burst=5)}, "limits['api'].rate"),
        ({"api": Limit(rate=1.0, burst=0)}, "limits['api'].burst: must be a positive integer"),
        ({"api": Limit(rate=1.0, burst=-3)}, "limits['api'].burst"),
        ({"api": Limit(rate=1.0, burst=2.5)}, "limits['api'].burst"),  # type: ignore[arg-type]
        ({"api": (1, 2)}, "limits['api']: must be a Limit"),
        ({}, "limits: must name at least one Limit"),
    ],
)
def test_bad_limits_are_config_errors_naming_the_key(limits: Any, message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        RateLimiter(limits)


def test_every_bad_limit_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        RateLimiter({"a": Limit(rate=0, burst=0), "b": Limit(rate=-1, burst=1)})
    text = str(caught.value)
    assert "limits['a'].rate" in text and "limits['a'].burst" in text and "limits['b'].rate" in text


def test_limit_per_rejects_zero_and_negative() -> None:
    assert Limit.per(60, 60) == Limit(rate=1.0, burst=60)
    with pytest.raises(ConfigError, match="period"):
        Limit.per(10, 0)
    with pytest.raises(ConfigError, match="burst"):
        Limit.per(-1, 60)


def test_unknown_limit_and_bad_cost() -> None:
    limiter = RateLimiter({"api": TEN})
    with pytest.raises(KeyError, match="no rate limit named 'nope'"):
        limiter.check("u", "nope")
    for cost in (0, -1, 11, 1.5, True):
        with pytest.raises(ValueError, match="cost must be an integer"):
            limiter.check("u", "api", cost)  # type: ignore[arg-type]


# -- local behaviour -----------------------------------------------------------------------


def test_burst_then_refusal_then_refill() -> None:
    clock = Clock()
    limiter = RateLimiter({"api": TEN}, clock=clock, wall=clock)
    decisions = [limiter.check("u", "api") for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert decisions[0].remaining == 9 and decisions[-1].retry_after == pytest.approx(1.0)
    assert decisions[-1].retry_after_header == "1"
    assert limiter.check("other", "api").allowed  # users are independent
    clock.now += 2.5
    assert [limiter.check("u", "api").allowed for _ in range(3)] == [True, True, False]


def test_buckets_stay_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter({"api": TEN}, max_buckets=3, clock=clock, wall=clock)
    for user in "abcd":
        limiter.check(user, "api")
    assert len(limiter) == 3
    assert limiter.metrics.buckets._value.get() == 3


def test_snapshot_written_to_context_only_on_material_change() -> None:
    clock = Clock()
    limiter = RateLimiter({"api": TEN}, clock=clock, wall=clock)
    context: dict[str, Any] = {}
    for _ in range(4):
        limiter.check("u", "api", context=context)
    assert context == {}  # within half a burst of a full bucket: nothing to save
    limiter.check("u", "api", context=context)
    assert context[RATELIMIT_FIELD]["api"] == [5.0, clock.now]


def test_calm_user_never_writes() -> None:
    clock = Clock()
    limiter = RateLimiter({"api": TEN}, clock=clock, wall=clock)
    context: dict[str, Any] = {}
    for _ in range(200):
        assert limiter.check("u", "api", context=context).allowed
        clock.now += 1.0
    assert context == {}


# -- a move between two stores on one real redis-server --------------------------------------


@pytest.mark.parametrize("spent_before_move", range(0, 11))
async def test_a_move_grants_less_than_half_a_burst(stores: Stores, spent_before_move: int) -> None:
    clock = Clock()
    a, b = await stores("A"), await stores("B")
    on_a = RateLimiter({"api": TEN}, store=a, clock=clock, wall=clock)
    on_b = RateLimiter({"api": TEN}, store=b, clock=clock, wall=clock)
    allowed = sum([(await on_a.hit("mover", "api")).allowed for _ in range(spent_before_move)])
    assert allowed == spent_before_move
    # The user moves: B acquires it (a takeover of A's copy) and rehydrates the snapshot.
    after = [(await on_b.hit("mover", "api")).allowed for _ in range(20)]
    extra = sum(after) - (TEN.burst - spent_before_move)
    assert 0 <= extra < TEN.burst * MATERIAL_SHARE
    assert after[-1] is False


async def test_exhausted_user_stays_refused_after_a_move_and_back(stores: Stores) -> None:
    clock = Clock()
    a, b = await stores("A"), await stores("B")
    on_a = RateLimiter({"api": TEN}, store=a, clock=clock, wall=clock)
    on_b = RateLimiter({"api": TEN}, store=b, clock=clock, wall=clock)
    assert all([(await on_a.hit("u", "api")).allowed for _ in range(10)])
    assert not (await on_a.hit("u", "api")).allowed
    refused = await on_b.hit("u", "api")
    assert not refused.allowed and refused.retry_after_header == "1"
    clock.now += 6.0
    assert sum([(await on_b.hit("u", "api")).allowed for _ in range(10)]) == 6
    # Back to A, whose own bucket says "full" by now: the snapshot B wrote (at 1 token left,
    # the last request not being material) holds A to B's count, not to a fresh burst.
    await eventually(lambda: not a.holds("u"))
    assert sum([(await on_a.hit("u", "api")).allowed for _ in range(10)]) == 1


async def test_steady_state_checks_cost_no_redis_command(
    stores: Stores, redis_server: RedisServer
) -> None:
    store = await stores("A")
    limiter = RateLimiter({"api": Limit(rate=1000.0, burst=1000)}, store=store)
    await limiter.hit("u", "api")
    before = redis_server.commandstats()
    for _ in range(200):
        assert (await limiter.hit("u", "api")).allowed
    assert redis_server.store_calls(before) == {}


async def test_redis_outage_limits_still_enforced_from_memory(
    stores: Stores, redis_server: RedisServer
) -> None:
    clock = Clock()
    store = await stores("A", listener_liveness=0.1, redis_timeout=0.1)
    limiter = RateLimiter({"api": TEN}, store=store, clock=clock, wall=clock)
    assert (await limiter.hit("u", "api")).allowed
    redis_server.kill()
    await eventually(lambda: not store.listener_connected)
    results = [(await limiter.hit("u", "api")).allowed for _ in range(12)]
    assert results == [True] * 9 + [False] * 3
    assert limiter.metrics.state_errors.labels("read")._value.get() >= 1
    # A fresh user with no reachable context is still limited (at most one burst).
    assert [(await limiter.hit("new", "api")).allowed for _ in range(11)] == [True] * 10 + [False]


# -- framework helpers ---------------------------------------------------------------------


async def test_aiohttp_middleware_refuses_with_retry_after(stores: Stores) -> None:
    store = await stores("A")
    limiter = RateLimiter({"api": Limit(rate=0.5, burst=3)}, store=store)

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(
        middlewares=[context_middleware(store), rate_limit_middleware(limiter, "api")]
    )
    app.router.add_get("/", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as http:
            statuses = []
            for _ in range(4):
                async with http.get(server.make_url("/"), headers={"X-Sticky-Key": "alice"}) as r:
                    statuses.append(r.status)
                    last = (r.headers.get("Retry-After"), await r.text())
            async with http.get(server.make_url("/")) as r:
                keyless = r.status
    finally:
        await server.close()
    assert statuses == [200, 200, 200, 429]
    assert last[0] == "2" and "rate limit 'api' exceeded" in last[1]
    assert keyless == 200
    # The snapshot was saved with a request: a new owner would start below half a burst.
    assert (await store.get("alice"))[RATELIMIT_FIELD]["api"][0] < 3 * MATERIAL_SHARE


async def test_asgi_middleware_refuses_with_retry_after(stores: Stores) -> None:
    store = await stores("A")
    limiter = RateLimiter({"api": Limit(rate=0.25, burst=2)}, store=store)

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = RateLimitMiddleware(Starlette(routes=[Route("/", hello)]), limiter, "api")
    app = StickyContextMiddleware(inner, store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        responses = [await client.get("/", headers={"X-Sticky-Key": "bob"}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[-1].headers["retry-after"] == "4"
    assert RATELIMIT_FIELD in await store.get("bob")


async def test_a_rerun_after_a_conflict_is_not_charged_twice(stores: Stores) -> None:
    store, rival = await stores("A"), await stores("B")
    limiter = RateLimiter({"api": Limit(rate=0.001, burst=5)}, store=store)
    runs = []

    async def handle(request: web.Request) -> web.Response:
        runs.append(1)
        get_context(request)["seen"] = len(runs)
        if len(runs) == 1:  # another instance takes the user over: the save conflicts
            await rival.update("erin", lambda c: c.update(rival=True))
        return web.Response(text="ok")

    app = web.Application(
        middlewares=[context_middleware(store), rate_limit_middleware(limiter, "api")]
    )
    app.router.add_get("/", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            ClientSession() as http,
            http.get(server.make_url("/"), headers={"X-Sticky-Key": "erin"}) as r,
        ):
            status = r.status
    finally:
        await server.close()
    assert status == 200 and len(runs) == 2
    assert limiter.metrics.decisions.labels("api", "allowed")._value.get() == 1
    assert limiter.check("erin", "api").remaining == 3  # one token for the request, one now


def test_helpers_reject_unknown_limit() -> None:
    limiter = RateLimiter({"api": TEN})
    with pytest.raises(KeyError):
        rate_limit_middleware(limiter, "nope")
    with pytest.raises(KeyError):
        RateLimitMiddleware(None, limiter, "nope")
