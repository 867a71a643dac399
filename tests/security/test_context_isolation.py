"""One user's context is never served to another (docs/THREAT_MODEL.md T10, T11).

Against a real redis-server of the test's own on a free port. Already proven in
tests/context/ (and not repeated here):

- tests/context/test_store.py::test_record_with_another_user_id_is_refused — a record whose
  stored ``uid`` differs is refused with RecordMismatch, on acquire and on revalidation, and
  the local copy is dropped;
- tests/context/test_pure.py::test_parse_acquire_refuses, ::test_parse_write,
  ::test_parse_snapshot_and_delete — every reply shape is checked against the user asked for;
- tests/context/test_faults.py::test_cancelled_call_never_hands_its_reply_to_the_next_caller —
  one cancelled call behind a delaying relay, then the next caller gets its own reply;
- tests/context/test_store.py::test_two_instances_editing_one_user_lose_no_update.

Added here: the mismatch seen through both middlewares (a 500 that carries none of the
other user's data), many users' requests at once through two app instances that keep
taking users from each other, the same end to end through the proxy, and random
cancellation of many concurrent calls sharing two Redis connections.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from stickyproxy.context import (
    ContextStore,
    RecordMismatch,
    StickyContextMiddleware,
    context_middleware,
    get_context,
    sticky_context,
)
from stickyproxy.context.errors import ContextError
from stickyproxy.context.scripts import record_key
from support.net import free_port
from support.redis import RedisServer

NS = "sec"
SECRET = "alice-private-data-7f3a"


async def _store(url: str, node: str, **kw: Any) -> ContextStore:
    # isolation, not latency, is under test: a generous bound on Redis calls, so a loaded
    # 2-core machine running every process of the test does not turn calls into 503s
    kw.setdefault("redis_timeout", "2s")
    store = ContextStore(url, node_id=node, namespace=NS, **kw)
    await store.start()
    return store


class App:
    """An aiohttp app instance with the context middleware on a free port."""

    def __init__(self, bid: str, store: ContextStore):
        self.id = bid
        self.store = store
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.crossed: list[tuple[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> App:
        async def touch(request: web.Request) -> web.Response:
            user = request.headers["X-Sticky-Key"]
            ctx = get_context(request)
            if ctx.get("owner", user) != user:
                self.crossed.append((user, dict(ctx)))
                return web.Response(status=500, text="CROSSED")
            ctx["owner"] = user
            await asyncio.sleep(random.random() * 0.005)  # let requests interleave
            if ctx.get("owner") != user:
                self.crossed.append((user, dict(ctx)))
                return web.Response(status=500, text="CROSSED")
            ctx.setdefault("log", []).append(request.match_info["rid"])
            return web.json_response({"user": user, "ctx": ctx, "by": self.id})

        async def peek(request: web.Request) -> web.Response:
            return web.json_response(get_context(request))

        app = web.Application(middlewares=[context_middleware(self.store)])
        app.router.add_put("/touch/{rid}", touch)
        app.router.add_get("/peek", peek)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def cleanup():
    things: list[Any] = []
    yield things
    for t in reversed(things):
        if isinstance(t, App):
            await t.stop()
        else:
            await t.close()


def _plant_foreign_record(server: RedisServer, user: str) -> None:
    """A record at ``user``'s key that holds another user's id and data (what a reply
    served to the wrong caller, or a key collision, would look like)."""
    with server.client() as c:
        c.hset(
            record_key(NS, user),
            mapping={
                "uid": "alice",
                "epoch": 7,
                "owner": "elsewhere",
                "data": json.dumps({"owner": "alice", "secret": SECRET}).encode(),
            },
        )


# ---------------------------------------------------------------------------------------
# a record holding another user's id, seen through the middlewares


async def test_foreign_record_through_the_aiohttp_middleware_is_500_without_its_data(
    redis_server, cleanup
):
    store = await _store(redis_server.url, "A")
    cleanup.append(store)
    app = await App("A", store).start()
    cleanup.append(app)
    _plant_foreign_record(redis_server, "bob")
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/peek"), ("PUT", "/touch/1")):
            async with s.request(method, app.url + path, headers={"X-Sticky-Key": "bob"}) as r:
                body = await r.text()
                assert r.status == 500, (method, r.status, body)
                assert SECRET not in body and "alice" not in body
    assert not store.holds("bob")
    with redis_server.client() as c:  # and nothing was written over it
        assert c.hget(record_key(NS, "bob"), "uid") == b"alice"


async def test_foreign_record_through_the_asgi_middleware_is_500_without_its_data(
    redis_server, cleanup
):
    store = await _store(redis_server.url, "A")
    cleanup.append(store)

    async def inner(scope, receive, send):
        ctx = sticky_context(scope)
        body = json.dumps(dict(ctx)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    app = StickyContextMiddleware(inner, store)
    _plant_foreign_record(redis_server, "bob")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/", headers={"X-Sticky-Key": "bob"})
    assert r.status_code == 500
    assert SECRET not in r.text and "alice" not in r.text


async def test_record_replaced_under_a_cached_user_is_refused_on_revalidation(
    redis_server, cleanup
):
    """The cached copy is revalidated after another instance took the user; a record
    that comes back holding another user's id is refused, not served."""
    a = await _store(redis_server.url, "A")
    b = await _store(redis_server.url, "B")
    cleanup += [a, b]
    async with a.edit("bob") as ctx:
        ctx["mine"] = "bob"
    async with b.edit("bob") as ctx:  # B takes bob over: A drops its copy
        ctx["mine"] = "bob"
    deadline = asyncio.get_running_loop().time() + 5
    while a.holds("bob"):  # once the takeover message has arrived
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    _plant_foreign_record(redis_server, "bob")
    with pytest.raises(RecordMismatch):
        await a.get("bob")
    assert not a.holds("bob")


# ---------------------------------------------------------------------------------------
# many users at once through two app instances that keep taking users from each other


async def test_concurrent_users_across_two_instances_never_see_each_others_context(
    redis_server, cleanup
):
    apps = []
    for node in ("A", "B"):
        store = await _store(redis_server.url, node)
        cleanup.append(store)
        app = await App(node, store).start()
        cleanup.append(app)
        apps.append(app)
    users = [f"user-{i}" for i in range(24)]
    rng = random.Random(8)
    plan = [(u, rid, rng.choice(apps)) for rid in range(12) for u in users]
    rng.shuffle(plan)
    ok: dict[str, list[str]] = defaultdict(list)
    statuses: list[int] = []
    sem = asyncio.Semaphore(64)

    async def one(s: aiohttp.ClientSession, user: str, rid: int, app: App) -> None:
        async with sem, s.put(f"{app.url}/touch/{user}.{rid}", headers={"X-Sticky-Key": user}) as r:
            statuses.append(r.status)
            if r.status == 200:
                doc = await r.json()
                assert doc["user"] == user and doc["ctx"]["owner"] == user, doc
                assert all(x.startswith(user + ".") for x in doc["ctx"]["log"]), doc
                ok[user].append(f"{user}.{rid}")
            else:  # a conflict or an unavailable store, told as one: never a crossing
                assert r.status in (409, 503), (r.status, await r.text())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        await asyncio.gather(*(one(s, u, rid, app) for u, rid, app in plan))
    assert not apps[0].crossed and not apps[1].crossed, apps[0].crossed + apps[1].crossed
    assert statuses.count(200) >= len(plan) * 0.8, statuses.count(409)
    # what Redis holds per user: only that user's entries, and every acknowledged one
    with redis_server.client() as c:
        for u in users:
            uid, data = c.hmget(record_key(NS, u), "uid", "data")
            assert uid == u.encode()
            ctx = json.loads(data)
            assert ctx["owner"] == u
            assert sorted(ctx["log"]) == sorted(ok[u]), u


async def test_end_to_end_through_the_proxy_each_user_sees_only_their_context(
    redis_server, cleanup, proxy
):
    apps = []
    for node in ("app-1", "app-2", "app-3"):
        store = await _store(redis_server.url, node)
        cleanup.append(store)
        app = await App(node, store).start()
        cleanup.append(app)
        apps.append(app)
    p = await proxy(apps)
    users = [f"e2e-{i}" for i in range(30)]
    seen: dict[str, set[str]] = defaultdict(set)
    statuses: list[int] = []

    async def one(s: aiohttp.ClientSession, user: str, rid: int) -> None:
        # the client also sends a forged X-Sticky-Key: the proxy replaces it
        async with s.put(
            f"http://127.0.0.1:{p.port}/touch/{user}.{rid}",
            headers={"X-User-Id": user, "X-Sticky-Key": "e2e-0"},
        ) as r:
            statuses.append(r.status)
            if r.status == 503:  # store unavailable, told as one
                return
            assert r.status == 200, await r.text()
            doc = await r.json()
            assert doc["user"] == user and doc["ctx"]["owner"] == user
            assert all(x.startswith(user + ".") for x in doc["ctx"]["log"])
            seen[user].add(doc["by"])

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, u, rid) for rid in range(6) for u in users))
    assert statuses.count(200) >= len(statuses) * 0.9, statuses.count(503)
    for u in users:
        assert seen[u] <= {p.pref(u)[0]}, (u, seen[u])  # sticky: one instance per user
    assert not any(a.crossed for a in apps)


# ---------------------------------------------------------------------------------------
# random cancellation of many concurrent calls sharing two connections


class DelayRelay:
    """A TCP relay in front of Redis that holds every reply back ``delay`` seconds, so a
    cancellation lands while a reply is in flight."""

    def __init__(self, target: int, delay: float):
        self.target, self.delay = target, delay
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> DelayRelay:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target)

        async def up():
            while data := await cr.read(65536):
                sw.write(data)
                await sw.drain()

        async def down():
            while data := await sr.read(65536):
                await asyncio.sleep(self.delay)
                cw.write(data)
                await cw.drain()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        self.tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
                self.tasks.discard(t)
            for w in (cw, sw):
                w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()


@pytest.mark.slow
async def test_random_cancellation_never_hands_one_users_reply_to_another(redis_server, cleanup):
    users = [f"c-{i}" for i in range(40)]
    writer = await _store(redis_server.url, "W")
    cleanup.append(writer)
    for u in users:
        async with writer.edit(u) as ctx:
            ctx["owner"] = u
    relay = await DelayRelay(redis_server.port, 0.01).start()
    cleanup.append(relay)
    readers = []
    for node in ("R1", "R2"):
        s = await _store(
            f"redis://127.0.0.1:{relay.port}/0",
            node,
            pool_size=2,
            redis_timeout="2s",
            breaker_failures=1000,
        )
        cleanup.append(s)
        readers.append(s)
    rng = random.Random(4)
    results = {"ok": 0, "cancelled": 0, "mismatch": 0, "other": 0}

    async def one(i: int) -> None:
        store = readers[i % 2]
        user = rng.choice(users)
        store._cache.pop(user)  # always through Redis (as tests/context does)
        try:
            if i % 3 == 0:

                async def edit():
                    async with store.edit(user) as ctx:
                        assert ctx.get("owner") == user, (user, dict(ctx))
                        ctx.setdefault("n", 0)
                        ctx["n"] += 1

                await asyncio.wait_for(edit(), rng.uniform(0.005, 0.25))
            else:
                ctx = await asyncio.wait_for(store.get(user), rng.uniform(0.005, 0.25))
                assert ctx.get("owner") == user, (user, dict(ctx))
            results["ok"] += 1
        except TimeoutError:
            results["cancelled"] += 1
        except RecordMismatch:
            results["mismatch"] += 1
        except ContextError:
            results["other"] += 1  # conflicts, unavailability: not crossings

    for round_ in range(8):
        await asyncio.gather(*(one(round_ * 40 + i) for i in range(40)))
    print("cancellation mix:", results)
    assert results["mismatch"] == 0, results  # a crossed reply would show as one
    # both happened often: calls completed and calls cancelled with replies in flight
    assert results["ok"] >= 40 and results["cancelled"] >= 40, results
    with redis_server.client() as c:
        for u in users:
            assert c.hget(record_key(NS, u), "uid") == u.encode()
            assert json.loads(c.hget(record_key(NS, u), "data"))["owner"] == u


# ---------------------------------------------------------------------------------------
# the key is only as trustworthy as its source


async def _alice_has_a_secret(app: App) -> None:
    async with app.store.edit("alice") as ctx:
        ctx["owner"] = "alice"
        ctx["secret"] = SECRET


async def test_unverified_key_source_lets_a_client_name_another_user(redis_server, cleanup, proxy):
    """Residual risk T11-R1 (docs/THREAT_MODEL.md): with a header, cookie, query or path key
    source the key is whatever the client sends. The proxy routes on it and the context
    library serves that user's context: authentication is the application's job unless the
    key comes from a verified JWT. This test pins the behaviour so the threat model stays true."""
    store = await _store(redis_server.url, "app-1")
    cleanup.append(store)
    app = await App("app-1", store).start()
    cleanup.append(app)
    await _alice_has_a_secret(app)
    p = await proxy([app])
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{p.port}/peek", headers={"X-User-Id": "alice"}) as r,
    ):
        assert r.status == 200
        assert (await r.json())["secret"] == SECRET  # mallory, claiming "alice"


async def test_verified_jwt_key_keeps_a_client_to_its_own_context(
    redis_server, cleanup, proxy, monkeypatch
):
    import time

    import jwt

    monkeypatch.setenv("SP_SEC_CTX_JWT", "ctx-secret-0123456789abcdef0123456789abcdef")
    store = await _store(redis_server.url, "app-1")
    cleanup.append(store)
    app = await App("app-1", store).start()
    cleanup.append(app)
    await _alice_has_a_secret(app)
    p = await proxy(
        [app],
        {
            "routing": {
                "keys": [
                    {
                        "from": "jwt",
                        "header": "Authorization",
                        "claim": "sub",
                        "algorithms": ["HS256"],
                        "secret_env": "SP_SEC_CTX_JWT",
                    }
                ],
                "no_key": "reject",
            },
            "headers": {"strip": ["X-User-Id"]},
        },
    )
    mallory = jwt.encode(
        {"sub": "mallory", "exp": int(time.time()) + 600},
        "ctx-secret-0123456789abcdef0123456789abcdef",
        algorithm="HS256",
    )
    url = f"http://127.0.0.1:{p.port}/peek"
    forged = {"X-User-Id": "alice", "X-Sticky-Key": "alice", "x_sticky_key": "alice"}
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={**forged, "Authorization": f"Bearer {mallory}"}) as r:
            assert r.status == 200
            body = await r.text()
            assert SECRET not in body and json.loads(body).get("owner") in (None, "mallory")
        async with s.get(url, headers=forged) as r:  # no token at all
            assert r.status == 400 and SECRET not in await r.text()
