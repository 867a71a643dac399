"""GET /hotkeys on the admin API, fed by real requests through the data plane: the hot user
comes first with its requests and share, keys are hashed as in the access log unless
``logging.access_key = "raw"``, and bad input gets a 400 naming the parameter."""

from __future__ import annotations

import pytest

from stickyproxy.routing.hotkeys import key_digest
from support.config import keys_where

HOT, WARM, COLD = 40, 10, 1


async def _traffic(p, users: list[str]) -> int:
    sent = 0
    for user, n in zip(users, (HOT, WARM) + (COLD,) * (len(users) - 2)):
        for _ in range(n):
            r = await p.get("/x", user=user)
            assert r.status == 200
            sent += 1
    return sent


@pytest.mark.parametrize("access_key", ["hash", "raw"])
async def test_hotkeys_shows_the_hot_user_first_with_its_share(backends, ops_proxy, access_key):
    bs = await backends("a", "b", "c")
    p = await ops_proxy(bs, {"hotkeys": {"sample_every": 1}, "logging": {"access_key": access_key}})
    users = ["hot-user", "warm-user"] + [f"cold-{i}" for i in range(8)]
    sent = await _traffic(p, users)
    r = await p.admin("GET", "/hotkeys?n=2")
    assert r.status == 200, r.text
    doc = r.json()
    assert doc["enabled"] is True and doc["requests"] == sent
    assert doc["hashed"] is (access_key != "raw")
    shown = [u if access_key == "raw" else key_digest(u) for u in users[:2]]
    assert [k["key"] for k in doc["keys"]] == shown
    hot = doc["keys"][0]
    assert hot["requests"] == HOT and hot["share"] == pytest.approx(HOT / sent, abs=1e-6)
    if access_key == "raw":
        assert hot["owner"] == p.pref("hot-user")[0]
    else:
        assert "owner" not in hot and "hot-user" not in r.text
    # the sketch size is exported
    assert (await p.metrics()).value("stickyproxy_hotkeys_tracked") == len(users)


async def test_hotkeys_samples_by_default(backends, ops_proxy):
    bs = await backends("a", "b")
    p = await ops_proxy(bs)
    for _ in range(64):
        await p.get("/x", user="only-user")
    doc = (await p.admin("GET", "/hotkeys")).json()
    # one in 16 counted, each weighing 16: the estimate is exact for a single user
    assert doc["sample_every"] == 16 and doc["requests"] == 64
    assert doc["keys"] == [
        {"key": key_digest("only-user"), "requests": 64, "upper": 64, "share": 1.0}
    ]


@pytest.mark.parametrize("query", ["n=0", "n=1001", "n=x", "n="])
async def test_hotkeys_refuses_a_bad_n(backends, ops_proxy, query):
    bs = await backends("a")
    p = await ops_proxy(bs)
    r = await p.admin("GET", f"/hotkeys?{query}")
    assert r.status == 400 and r.json()["error"].startswith("n: expected an integer")


async def test_hotkeys_off(backends, ops_proxy):
    bs = await backends("a")
    p = await ops_proxy(bs, {"hotkeys": {"enabled": False}})
    await p.get("/x", user=keys_where(p.pref, lambda pr: True)[0])
    doc = (await p.admin("GET", "/hotkeys")).json()
    assert doc == {"enabled": False, "keys": []}
    assert p.svc.table.router.hotkeys is None
