"""The admin API: the JSON each endpoint returns, the probes, /metrics' content type, and
bearer-token protection of the mutating endpoints."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from support.config import route_json
from support.metrics import Metrics

BACKEND_FIELDS = {
    "id",
    "url",
    "protocol",
    "weight",
    "state",
    "usable",
    "healthy",
    "drained",
    "ejected_for",
    "ejections",
    "failback_in",
    "inflight",
    "websocket_tunnels",
    "key_share",
    "reason",
    "since_change",
}


async def test_read_endpoints_json_shapes(backends, ops_proxy):
    a, b, c = await backends("a", "b", "c")
    b.weight = 2
    p = await ops_proxy([a, b, c], {"routing": {"vnodes": 40}})

    r = await p.admin("GET", "/backends")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    assert list(doc) == ["backends"]
    rows = doc["backends"]
    assert [row["id"] for row in rows] == ["a", "b", "c"]  # config order
    for row, be in zip(rows, (a, b, c)):
        assert set(row) == BACKEND_FIELDS, set(row) ^ BACKEND_FIELDS
        assert row["url"] == be.url and row["protocol"] == "http/1.1"
        assert row["weight"] == (2 if be is b else 1)
        assert row["state"] == "up" and row["usable"] is True and row["healthy"] is True
        assert row["drained"] is False and row["ejections"] == 0
        assert row["ejected_for"] == 0 and row["failback_in"] == 0
        assert row["inflight"] == 0 and row["websocket_tunnels"] == 0
        assert isinstance(row["reason"], str)
        assert 0 < row["key_share"] < 1
    assert abs(sum(row["key_share"] for row in rows) - 1) < 1e-5
    assert rows[1]["key_share"] > rows[0]["key_share"]  # weight 2

    r = await p.admin("GET", "/ring")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    ring = r.json()
    assert set(ring) == {"fingerprint", "vnodes", "points", "members"}
    assert ring["fingerprint"] == p.fingerprint
    assert ring["vnodes"] == 40 and ring["points"] == 40 * 4
    assert [m["id"] for m in ring["members"]] == ["a", "b", "c"]
    assert {m["id"]: m["weight"] for m in ring["members"]} == {"a": 1, "b": 2, "c": 1}
    assert {m["id"]: m["key_share"] for m in ring["members"]} == {
        row["id"]: row["key_share"] for row in rows
    }

    keys = ["alice", "bob", "user-17", "ü-ñ"]
    cli = route_json(p.path, *keys)  # `stickyproxy route --json` agrees
    for k in keys:
        s = await p.session()
        async with s.get(f"http://127.0.0.1:{p.admin_port}/route", params={"key": k}) as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert set(doc) == {
            "key",
            "owner",
            "preference",
            "chosen",
            "route",
            "why",
            "states",
            "ring",
        }
        assert doc["key"] == k and doc["ring"] == p.fingerprint
        assert doc["preference"] == cli[k] == p.pref(k)
        assert doc["owner"] == doc["chosen"] == cli[k][0]
        assert doc["route"] == "primary" and doc["why"]
        assert doc["states"] == {bid: "up" for bid in cli[k]}

    for target in ("/route", "/route?key=", "/route?other=1"):
        r = await p.admin("GET", target)
        assert r.status == 400, (target, r.status)
        assert "key" in r.json()["error"]

    r = await p.admin("GET", "/healthz")
    assert r.status == 200 and r.text == "ok\n"
    r = await p.admin("GET", "/readyz")
    assert r.status == 200 and r.text == "ready\n"

    r = await p.admin("GET", "/metrics")
    assert r.status == 200
    ctype = r.headers["Content-Type"]
    assert ctype.startswith("text/plain") and "version=" in ctype, ctype
    fams = {f.name for f in text_string_to_metric_families(r.text)}
    for name in (
        "requests",
        "request_duration_seconds",
        "route_decisions",
        "retries",
        "upstream_errors",
        "rejected_requests",
        "health_checks",
        "ejections",
        "ring_changes",
        "reloads",
        "backend_up",
        "backend_inflight",
        "backend_key_share",
        "client_connections",
        "websocket_tunnels",
    ):
        assert f"stickyproxy_{name}" in fams, name
    m = Metrics(r.text)
    assert m.types["stickyproxy_requests"] == "counter"
    assert m.types["stickyproxy_request_duration_seconds"] == "histogram"
    assert m.types["stickyproxy_backend_up"] == "gauge"

    r = await p.admin("GET", "/nothing-here")
    assert r.status == 404 and "error" in r.json()


async def test_readyz_is_503_when_every_backend_is_drained(backends, ops_proxy):
    bs = await backends("a", "b")
    p = await ops_proxy(bs)
    assert (await p.admin("POST", "/backends/a/drain")).status == 200
    assert (await p.admin("GET", "/readyz")).status == 200  # b is still usable
    assert (await p.admin("POST", "/backends/b/drain")).status == 200
    r = await p.admin("GET", "/readyz")
    assert r.status == 503 and "no backend is usable" in r.text
    resp = await p.get("/x", user="u")
    assert resp.status == 503 and resp.has("Retry-After")
    assert (await p.admin("POST", "/backends/b/undrain")).status == 200
    assert (await p.admin("GET", "/readyz")).status == 200
    assert (await p.admin("GET", "/healthz")).status == 200


async def test_unknown_backend_is_404(backends, ops_proxy):
    bs = await backends("a")
    p = await ops_proxy(bs)
    for action in ("drain", "undrain"):
        r = await p.admin("POST", f"/backends/nope/{action}")
        assert r.status == 404, r.text
        assert "nope" in r.json()["error"]
    assert (await p.backend_view())["a"]["drained"] is False


async def _assert_denied(p, method: str, path: str, **kw) -> None:
    r = await p.admin(method, path, **kw)
    assert r.status == 401, (path, kw, r.status, r.text)
    assert r.headers["WWW-Authenticate"].lower().startswith("bearer"), r.headers
    assert "error" in r.json()


async def test_mutating_endpoints_require_the_bearer_token(backends, ops_proxy):
    bs = await backends("a", "b")
    p = await ops_proxy(bs, {"admin": {"token": "s3cret-token"}})
    for path in ("/backends/a/drain", "/backends/a/undrain", "/reload", "/backends/nope/drain"):
        await _assert_denied(p, "POST", path)  # no header
        await _assert_denied(p, "POST", path, token="wrong")  # wrong token
        await _assert_denied(p, "POST", path, token="s3cret-token-and-more")
        await _assert_denied(p, "POST", path, headers={"Authorization": "Basic czNjcmV0LXRva2Vu"})
        await _assert_denied(p, "POST", path, headers={"Authorization": "s3cret-token"})
    assert (await p.backend_view())["a"]["drained"] is False  # nothing happened
    m = await p.metrics()
    assert m.value("stickyproxy_reloads_total", result="success") == 0

    r = await p.admin("POST", "/backends/a/drain", token="s3cret-token")
    assert r.status == 200 and r.json() == {"backend": "a", "drained": True}
    r = await p.admin(
        "POST", "/backends/a/undrain", headers={"Authorization": "bearer s3cret-token"}
    )  # scheme is case-insensitive
    assert r.status == 200 and r.json()["drained"] is False
    r = await p.admin("POST", "/backends/nope/drain", token="s3cret-token")
    assert r.status == 404
    r = await p.admin("POST", "/reload", token="s3cret-token")
    assert r.status == 200 and r.json()["reloaded"] is True
    # reads stay open
    for path in ("/backends", "/ring", "/route?key=u", "/healthz", "/readyz", "/metrics"):
        assert (await p.admin("GET", path)).status == 200, path


async def test_token_from_the_environment(backends, ops_proxy, monkeypatch):
    monkeypatch.setenv("OPS_ADMIN_TOKEN", "from-env")
    bs = await backends("a")
    p = await ops_proxy(bs, {"admin": {"token_env": "OPS_ADMIN_TOKEN"}})
    await _assert_denied(p, "POST", "/backends/a/drain")
    await _assert_denied(p, "POST", "/backends/a/drain", token="OPS_ADMIN_TOKEN")
    r = await p.admin("POST", "/backends/a/drain", token="from-env")
    assert r.status == 200
