"""examples/asgi_app.py through httpx's ASGITransport, against a redis-server of its own."""

from __future__ import annotations

import httpx

from stickyproxy.context import ContextStore

from .conftest import as_user


async def test_profile_is_kept_in_the_users_context(redis_server):
    import asgi_app

    store = ContextStore(redis_server.url, node_id="asgi-1", namespace="asgi")
    await store.start()
    try:
        app = asgi_app.build(store, "app-1")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            headers = {**as_user("alice"), "X-Sticky-Route": "failover"}
            assert (await c.post("/visits", headers=headers)).json() == {"visits": 1}
            assert (await c.post("/visits", headers=headers)).json() == {"visits": 2}
            r = await c.put("/theme", json={"theme": "dark"}, headers=headers)
            assert r.json() == {"theme": "dark"}
            r = await c.put("/theme", json={"theme": "neon"}, headers=headers)
            assert r.status_code == 400
            before = store.metrics.registry.get_sample_value("stickyctx_writes_total")
            r = await c.get("/me", headers=headers)
            assert r.json() == {
                "user": "alice",
                "visits": 2,
                "theme": "dark",
                "served_by": "app-1",
                "route": "failover",
            }
            assert store.metrics.registry.get_sample_value("stickyctx_writes_total") == before
            r = await c.get("/me", headers=as_user("bob"))
            assert r.json()["visits"] == 0
            assert (await c.get("/me")).status_code == 400
            assert (await c.get("/healthz")).text == "ok\n"
            r = await c.get("/metrics")
            assert r.status_code == 200 and "stickyctx_writes_total 3.0" in r.text
    finally:
        await store.close()

    other = ContextStore(redis_server.url, node_id="asgi-2", namespace="asgi")
    await other.start()
    try:
        transport = httpx.ASGITransport(app=asgi_app.build(other, "app-2"))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            r = await c.get("/me", headers=as_user("alice"))
            assert r.json()["visits"] == 2 and r.json()["theme"] == "dark"
    finally:
        await other.close()


async def test_lifespan_starts_and_closes_the_store(redis_server):
    import asgi_app

    store = ContextStore(redis_server.url, node_id="asgi-3", namespace="asgi")
    app = asgi_app.build(store, "app-3")
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            assert store.listener_connected

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
