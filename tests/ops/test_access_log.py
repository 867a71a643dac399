"""The access log: one record per request on the "stickyproxy.access" logger, as a JSON
object or one text line, with the user key hashed, raw or left out; nothing when off."""

from __future__ import annotations

import json
import logging
import time

import pytest

from stickyproxy.routing.router import key_digest
from support.backends import DeadBackend
from support.config import keys_where

FIELDS = {
    "time",
    "client",
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "backend",
    "route",
    "retries",
    "key",
}


def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stickyproxy.access"]


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="stickyproxy.access")
    return caplog


async def test_json_access_log_one_object_per_request(backends, ops_proxy, access):
    a, b = await backends("a", "b")
    d = DeadBackend("d")
    p = await ops_proxy(
        [a, b, d], {"logging": {"access": "json"}, "passive": {"connect_down": "0s"}}
    )
    t0 = time.time()
    alice = "alice"
    r1 = await p.get("/shop/cart?item=7", user=alice)
    r2 = await p.get("/upload", user=alice, method="POST", body=b"0123456789")
    (via_d,) = keys_where(p.pref, lambda pr: pr[0] == "d")
    r3 = await p.get("/retried", user=via_d)
    r4 = await p.get("/anonymous")  # no key: round-robin
    assert [r.status for r in (r1, r2, r3, r4)] == [200, 200, 200, 200]
    lines = access_lines(access)
    assert len(lines) == 4, lines
    recs = [json.loads(line) for line in lines]
    for rec in recs:
        assert set(rec) == FIELDS, set(rec) ^ FIELDS
        assert t0 - 1 <= rec["time"] <= time.time() + 1
        assert rec["client"] == "127.0.0.1"
        assert isinstance(rec["duration_ms"], (int, float)) and 0 <= rec["duration_ms"] < 5000
    first, post, retried, anon = recs
    assert first["method"] == "GET" and first["path"].startswith("/shop/cart")
    assert first["status"] == 200 and first["bytes"] == len(r1.body)
    assert first["backend"] == p.pref(alice)[0] and first["route"] == "primary"
    assert first["retries"] == 0
    assert first["key"] == key_digest(alice) and alice not in lines[0]
    assert post["method"] == "POST" and post["path"] == "/upload"
    assert post["bytes"] == len(r2.body) == 10 and post["key"] == key_digest(alice)
    assert retried["backend"] == p.pref(via_d)[1] and retried["route"] == "failover"
    assert retried["retries"] == 1 and retried["key"] == key_digest(via_d)
    assert anon["key"] is None and anon["route"] == "no_key" and anon["backend"] in ("a", "b")


async def test_raw_and_no_key_in_the_access_log(backends, ops_proxy, access):
    bs = await backends("a")
    p = await ops_proxy(bs, {"logging": {"access": "json", "access_key": "raw"}})
    await p.get("/", user="bob@example.com")
    p.rewrite(bs, {"logging": {"access": "json", "access_key": "none"}})
    assert (await p.admin("POST", "/reload")).status == 200  # applies to the next request
    await p.get("/", user="bob@example.com")
    raw, none = (json.loads(line) for line in access_lines(access))
    assert raw["key"] == "bob@example.com"
    assert none["key"] is None and "bob" not in json.dumps(none)


async def test_text_access_log_is_one_line(backends, ops_proxy, access):
    bs = await backends("a")
    p = await ops_proxy(bs, {"logging": {"access": "text"}})
    r = await p.get("/path?x=1", user="carol")
    (line,) = access_lines(access)
    assert "\n" not in line
    assert line.startswith('127.0.0.1 "GET /path?x=1" 200 ')
    assert f" {len(r.body)} " in line
    for part in ("backend=a", "route=primary", "retries=0", f"key={key_digest('carol')}"):
        assert part in line, line
    assert "carol" not in line


async def test_access_log_off_writes_nothing(backends, ops_proxy, access):
    bs = await backends("a")
    p = await ops_proxy(bs, {"logging": {"access": "off"}})
    for i in range(3):
        assert (await p.get("/", user=f"u{i}")).status == 200
    assert access_lines(access) == []


async def test_proxy_made_responses_are_logged_with_their_size(backends, ops_proxy, access):
    (a,) = await backends("a")
    p = await ops_proxy([a], {"logging": {"access": "json"}})
    assert (await p.admin("POST", "/backends/a/drain")).status == 200
    r = await p.get("/x", user="dave")
    assert r.status == 503
    (rec,) = (json.loads(line) for line in access_lines(access))
    assert rec["status"] == 503 and rec["backend"] is None and rec["route"] == "none"
    assert rec["key"] == key_digest("dave")
    assert rec["bytes"] == len(r.body) > 0, (rec["bytes"], r.body)
