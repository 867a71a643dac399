"""The shop example in both modes, against a redis-server of the test's own: cart, counter,
rate limit, WebSocket job progress, Redis commands per request, a user's state carried
over to another instance, and what a Redis outage leaves working. Logout and the price cache:
test_shop_logout_prices.py and test_shop_through_proxy.py."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from shop.catalog import MAX_QTY_PER_ADD

from .conftest import IO_TIMEOUT, as_user, eventually

MODES = [pytest.param(False, id="sticky"), pytest.param(True, id="stateless")]


async def metric(client, name: str, **labels: str) -> float | None:
    """One sample of the instance's /metrics, or None."""
    r = await client.get("/metrics")
    for family in text_string_to_metric_families(await r.text()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.mark.parametrize("stateless", MODES)
async def test_cart_add_list_remove(shop, stateless):
    c = await shop(stateless=stateless)
    alice = as_user("alice")
    r = await c.post("/cart/items", json={"item": "apple", "qty": 2}, headers=alice)
    assert r.status == 200 and await r.json() == {"item": "apple", "qty": 2}
    assert r.headers["X-Served-By"] == "app-1"
    r = await c.post("/cart/items", json={"item": "apple"}, headers=alice)
    assert (await r.json())["qty"] == 3
    await c.post("/cart/items", json={"item": "tea", "qty": 1}, headers=alice)
    r = await c.get("/cart", headers=alice)
    assert await r.json() == {"user": "alice", "items": {"apple": 3, "tea": 1}, "count": 4}
    r = await c.delete("/cart/items/apple", headers=alice)
    assert await r.json() == {"item": "apple", "removed": True}
    r = await c.delete("/cart/items/apple", headers=alice)
    assert await r.json() == {"item": "apple", "removed": False}
    r = await c.get("/cart", headers=as_user("bob"))
    assert (await r.json())["items"] == {}
    assert (await (await c.get("/cart", headers=alice)).json())["items"] == {"tea": 1}


@pytest.mark.parametrize("stateless", MODES)
async def test_counter_only_goes_up(shop, stateless):
    c = await shop(stateless=stateless)
    assert await (await c.get("/counter", headers=as_user("u"))).json() == {"value": 0}
    values = [
        (await (await c.post("/counter", headers=as_user("u"))).json())["value"] for _ in range(5)
    ]
    assert values == [1, 2, 3, 4, 5]
    assert await (await c.get("/counter", headers=as_user("u"))).json() == {"value": 5}


@pytest.mark.parametrize("stateless", MODES)
async def test_bad_requests_get_a_reason(shop, stateless):
    c = await shop(stateless=stateless)
    r = await c.get("/cart")
    assert r.status == 400 and "X-Sticky-Key" in await r.text()
    cases = [
        ({"item": "caviar"}, "unknown product"),
        ({"item": "tea", "qty": 0}, "qty must be"),
        ({"item": "tea", "qty": MAX_QTY_PER_ADD + 1}, "qty must be"),
        ({"item": "tea", "qty": True}, "qty must be"),
        ([1, 2], "JSON object"),
    ]
    for body, reason in cases:
        r = await c.post("/cart/items", json=body, headers=as_user("u"))
        assert r.status == 400 and reason in (await r.json())["error"], body
    r = await c.post("/cart/items", data=b"{nope", headers=as_user("u"))
    assert r.status == 400
    r = await c.post("/cart/items", data=b"x" * 10_000, headers=as_user("u"))
    assert r.status == 413
    r = await c.get("/cart", headers=as_user("x" * 2000))
    assert r.status == 400


async def test_stateless_accepts_the_client_header_behind_any_balancer(shop):
    c = await shop(stateless=True)
    await c.post("/counter", headers={"X-User-Id": "carol"})
    assert await (await c.get("/counter", headers=as_user("carol"))).json() == {"value": 1}


@pytest.mark.parametrize("stateless", MODES)
async def test_61st_request_in_a_window_is_refused(shop, stateless):
    c = await shop(stateless=stateless)
    for i in range(60):
        r = await c.get("/counter", headers=as_user("busy"))
        assert r.status == 200, i
    r = await c.get("/counter", headers=as_user("busy"))
    assert r.status == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert "60 requests per 60s" in (await r.json())["error"]
    assert r.headers["X-Served-By"] == "app-1"
    assert (await c.get("/counter", headers=as_user("calm"))).status == 200
    assert (await c.get("/healthz")).status == 200
    assert await metric(c, "shop_rate_limited_total") == 1


@pytest.mark.parametrize("stateless", MODES)
async def test_rate_limit_window_reopens(shop, stateless):
    c = await shop(stateless=stateless, rate_limit=3, rate_window=0.3)
    statuses = [(await c.get("/counter", headers=as_user("u"))).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]

    async def reopened():
        return (await c.get("/counter", headers=as_user("u"))).status == 200

    await eventually(reopened, deadline=IO_TIMEOUT, interval=0.1, what="window reopened")


async def test_a_move_grants_less_than_half_a_burst(shop):
    """The sticky limiter's bucket goes into the user's context whenever the stored copy
    overstates it by half a burst, so the instance taking the user over starts from it:
    a user who spent the whole burst gets fewer than half of it again, not a fresh burst."""
    a, b = (
        await shop("app-1", rate_limit=10, rate_window=600),
        await shop("app-2", rate_limit=10, rate_window=600),
    )
    statuses = [(await a.get("/counter", headers=as_user("busy"))).status for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    await a.close()
    moved = [await b.get("/counter", headers=as_user("busy")) for _ in range(6)]
    assert all(r.headers["X-Served-By"] == "app-2" for r in moved)
    assert sum(r.status == 200 for r in moved) < 10 // 2
    assert moved[-1].status == 429 and 1 <= int(moved[-1].headers["Retry-After"]) <= 60
    assert (
        await metric(b, "stickyctx_ratelimit_decisions_total", limit="requests", outcome="refused")
        >= 1
    )


@pytest.mark.parametrize("stateless", MODES)
async def test_job_progress_over_websocket(shop, stateless):
    steps = 5
    c = await shop(stateless=stateless, job_steps=steps, job_step_seconds=0.03)
    r = await c.post("/jobs", headers=as_user("alice"))
    assert r.status == 202
    job = await r.json()
    assert job["ws"] == f"/jobs/{job['id']}/ws" and job["state"] == "running"
    ws = await c.ws_connect(job["ws"], headers=as_user("alice"))
    seen = []
    async with asyncio.timeout(IO_TIMEOUT):
        async for msg in ws:
            assert msg.type == aiohttp.WSMsgType.TEXT
            seen.append(json.loads(msg.data))
    assert ws.close_code == 1000
    assert [m["step"] for m in seen] == sorted({m["step"] for m in seen})
    assert seen[-1] == {"id": job["id"], "step": steps, "steps": steps, "state": "done"}
    assert all(m["state"] == "running" for m in seen[:-1])
    r = await c.get(f"/jobs/{job['id']}", headers=as_user("alice"))
    assert (await r.json())["state"] == "done"
    assert (await c.get(f"/jobs/{job['id']}", headers=as_user("mallory"))).status == 404
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await c.ws_connect(job["ws"], headers=as_user("mallory"))
    assert e.value.status == 404


async def test_finished_job_is_reported_by_the_next_instance(shop):
    """The sticky job's outcome is written to the user's context: the instance that takes
    the user over reports the job done instead of unknown."""
    a, b = await shop("app-1", job_steps=2, job_step_seconds=0.02), await shop("app-2")
    job = await (await a.post("/jobs", headers=as_user("alice"))).json()

    async def done_on_a():
        return (await (await a.get(f"/jobs/{job['id']}", headers=as_user("alice"))).json())[
            "state"
        ] == "done"

    await eventually(done_on_a, what="job done on app-1")
    await a.close()
    r = await b.get(f"/jobs/{job['id']}", headers=as_user("alice"))
    assert r.headers["X-Served-By"] == "app-2"
    assert await r.json() == {"id": job["id"], "step": 2, "steps": 2, "state": "done"}
    assert (await b.get(f"/jobs/{job['id']}", headers=as_user("mallory"))).status == 404


async def test_sticky_reads_cost_no_redis_command(shop, redis_server):
    c = await shop()
    await c.post("/cart/items", json={"item": "milk"}, headers=as_user("alice"))
    before = redis_server.commandstats()
    # 28 requests: within half of the 60-request burst, so the rate limiter writes nothing.
    for _ in range(14):
        assert (await c.get("/cart", headers=as_user("alice"))).status == 200
        assert (await c.get("/counter", headers=as_user("alice"))).status == 200
    assert redis_server.calls_since(before) == {}
    before = redis_server.commandstats()
    await c.post("/counter", headers=as_user("alice"))
    calls = redis_server.calls_since(before)
    # one round trip: the fenced write script (the commands it runs inside are counted too)
    assert calls.pop("evalsha") == 1
    assert set(calls) <= {"hmget", "hset", "pexpire"}


async def test_stateless_pays_redis_on_every_request(shop, redis_server):
    c = await shop(stateless=True)
    await c.post("/cart/items", json={"item": "milk"}, headers=as_user("alice"))
    expected = {
        ("GET", "/cart"): {"incrby": 1, "pexpire": 1, "hgetall": 1},
        ("GET", "/counter"): {"incrby": 1, "pexpire": 1, "get": 1},
        ("POST", "/counter"): {"incrby": 2, "pexpire": 1},
    }
    for (method, path), calls in expected.items():
        before = redis_server.commandstats()
        r = await c.request(method, path, headers=as_user("alice"))
        assert r.status == 200
        assert redis_server.calls_since(before) == calls, (method, path)
    before = redis_server.commandstats()
    await c.post("/cart/items", json={"item": "milk"}, headers=as_user("alice"))
    assert redis_server.calls_since(before) == {"incrby": 1, "pexpire": 1, "hincrby": 1}


async def test_cart_and_counter_follow_the_user_to_another_instance(shop):
    a, b = await shop("app-1"), await shop("app-2")
    alice = as_user("alice")
    await a.post("/cart/items", json={"item": "apple", "qty": 2}, headers=alice)
    for _ in range(3):
        await a.post("/counter", headers=alice)
    await a.close()
    r = await b.get("/cart", headers=alice)
    assert r.headers["X-Served-By"] == "app-2"
    assert (await r.json())["items"] == {"apple": 2}
    assert (await (await b.post("/counter", headers=alice)).json())["value"] == 4
    assert await metric(b, "stickyctx_acquisitions_total", reason="takeover") == 1


async def test_user_moving_back_sees_the_newest_state(shop):
    a, b = await shop("app-1"), await shop("app-2")
    alice = as_user("alice")
    await a.post("/counter", headers=alice)
    await b.post("/counter", headers=alice)

    async def a_dropped_alice():
        return await metric(a, "stickyctx_entries") == 0

    await eventually(a_dropped_alice, what="app-1 told that app-2 took alice over")
    assert (await (await a.post("/counter", headers=alice)).json())["value"] == 3


async def test_metrics_carry_the_library_and_the_app(shop):
    sticky, stateless = await shop("app-1"), await shop("app-2", stateless=True)
    await sticky.get("/cart", headers=as_user("u"))
    assert await metric(sticky, "stickyctx_entries") == 1
    assert await metric(sticky, "shop_info", node="app-1", mode="sticky") == 1
    assert await metric(sticky, "shop_requests_total", route="/cart", status="200") == 1
    assert await metric(sticky, "shop_rate_limit_users") == 1
    assert await metric(stateless, "stickyctx_entries") is None
    assert await metric(stateless, "shop_info", node="app-2", mode="stateless") == 1


async def test_stateless_redis_down_is_503(shop, redis_server):
    c = await shop(stateless=True)
    assert (await c.get("/cart", headers=as_user("u"))).status == 200
    redis_server.stop()
    async with asyncio.timeout(IO_TIMEOUT):
        r = await c.get("/cart", headers=as_user("u"))
    assert r.status == 503 and r.headers["Retry-After"] == "1"


async def listener_down(client) -> bool:
    """The store's takeover listener lost Redis: no held copy counts as verified any more."""
    return await metric(client, "stickyctx_listener_up") == 0


async def test_sticky_redis_outage_rate_limit_still_enforced_from_memory(shop, redis_server):
    """Redis down: the owner's buckets are in memory, so the limit holds (429, not 503 and not
    a free pass) on a path that needs no context."""
    c = await shop(rate_limit=3, rate_window=600)
    alice = as_user("alice")
    assert (await c.get("/prices/apple", headers=alice)).status == 200
    redis_server.stop()
    await eventually(lambda: listener_down(c), what="takeover listener down")
    async with asyncio.timeout(IO_TIMEOUT):
        statuses = [(await c.get("/prices/apple", headers=alice)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    # decided from memory alone once the context could not be read (after the stale-read window)
    assert await metric(c, "stickyctx_ratelimit_state_errors_total", op="read") >= 1


async def test_sticky_redis_outage_a_running_job_is_followed_to_its_end(shop, redis_server):
    """Redis down: the job's progress is in the owner's memory and its WebSocket is served
    from there; the job runs to its end (its outcome is saved once Redis is back)."""
    steps = 4
    c = await shop(job_steps=steps, job_step_seconds=0.05)
    job = await (await c.post("/jobs", headers=as_user("alice"))).json()
    redis_server.stop()
    await eventually(lambda: listener_down(c), what="takeover listener down")
    ws = await c.ws_connect(job["ws"], headers=as_user("alice"))
    async with asyncio.timeout(IO_TIMEOUT):
        seen = [json.loads(msg.data) async for msg in ws]
    assert seen[-1] == {"id": job["id"], "step": steps, "steps": steps, "state": "done"}
