"""Backends from discovery, through the real proxy: the discovered set is what the proxy
routes by, a change goes through the reload path (the moved share is what the ring says), an
emptied or mostly-dropped set is refused, and two proxies fed one source agree key by key."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path

import aiohttp
import pytest

from stickyproxy.config import loads
from stickyproxy.control.server import Service
from stickyproxy.routing.plan import exact
from stickyproxy.routing.ring import Member, Ring
from support.config import build_toml
from support.net import eventually

USERS = [f"user-{i}" for i in range(200)]


def write_members(path: Path, backends) -> None:
    """Replace the members file atomically, as a sidecar or deploy tool would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"id": b.id, "url": b.url} for b in backends]))
    os.replace(tmp, path)


async def start(
    tmp_path: Path,
    members: Path,
    *,
    name: str = "proxy.toml",
    settle: str = "0s",
    max_drop_share: float = 0.5,
) -> Service:
    text = build_toml([], {"discovery": {"settle": settle, "max_drop_share": max_drop_share}})
    text += f'\n[discovery.file]\npath = "{members}"\ninterval = "50ms"\n'
    path = tmp_path / name
    path.write_text(text)
    svc = Service(loads(text, str(path)), str(path))
    await svc.start()
    return svc


async def owners(svc: Service, users=USERS) -> dict[str, str]:
    """Which backend answered each user, asked through the proxy."""
    out = {}
    async with aiohttp.ClientSession() as s:
        for u in users:
            async with s.get(f"http://127.0.0.1:{svc.proxy.port}/", headers={"X-User-Id": u}) as r:
                assert r.status == 200, await r.text()
                out[u] = r.headers["X-Backend"]
                await r.read()
    return out


def ids(svc: Service) -> set[str]:
    return set(svc.table.states)


async def test_the_proxy_routes_by_the_discovered_set_and_follows_it(backends, tmp_path, caplog):
    bs = await backends("app-0", "app-1", "app-2", "app-3")
    members = tmp_path / "members.json"
    write_members(members, bs[:3])
    svc = await start(tmp_path, members)
    try:
        await eventually(lambda: ids(svc) == {"app-0", "app-1", "app-2"}, what="first set")
        await eventually(lambda: svc.ready()[0], what="ready")
        before = Ring([Member(b.id, 1) for b in bs[:3]], svc.config.routing.vnodes)
        for b in bs:
            b.requests.clear()
        # scale up under load: every request answered while the set changes
        load_errors: list[str] = []
        stop = asyncio.Event()

        async def load():
            async with aiohttp.ClientSession() as s:
                i = 0
                while not stop.is_set() and i < 5000:
                    u = USERS[i % len(USERS)]
                    i += 1
                    async with s.get(
                        f"http://127.0.0.1:{svc.proxy.port}/", headers={"X-User-Id": u}
                    ) as r:
                        if r.status != 200:
                            load_errors.append(f"{u}: {r.status}")
                        await r.read()

        task = asyncio.create_task(load())
        caplog.set_level(logging.INFO, logger="stickyproxy")
        write_members(members, bs)
        await eventually(lambda: ids(svc) == {b.id for b in bs}, what="scaled up")
        after = Ring([Member(b.id, 1) for b in bs], svc.config.routing.vnodes)
        # the applied change is logged with the share of users `stickyproxy plan` predicts
        predicted = exact(before, after).moved
        applied = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("reload (discovery) applied")
        ]
        assert applied and f"{predicted * 100:.1f}% of users move" in applied[-1], applied
        moved_users = {u for u in USERS if before.owner(u) != after.owner(u)}
        # every moved user now lands on the new member, the others stay
        assert moved_users and all(after.owner(u) == "app-3" for u in moved_users)
        stop.set()
        await task
        assert load_errors == []
        for b in bs:
            for rec in b.requests:
                assert (
                    after.owner(rec.one("X-Sticky-Key")) == b.id
                    or before.owner(rec.one("X-Sticky-Key")) == b.id
                )
        # scale down: app-3's users go back to their old owners
        write_members(members, bs[:3])
        await eventually(lambda: ids(svc) == {"app-0", "app-1", "app-2"}, what="scaled down")
        assert svc.table.router.fingerprint == before.fingerprint
    finally:
        await svc.stop()


async def test_an_emptied_or_mostly_dropped_set_is_refused(backends, tmp_path):
    bs = await backends("app-0", "app-1", "app-2", "app-3")
    members = tmp_path / "members.json"
    write_members(members, bs)
    svc = await start(tmp_path, members, max_drop_share=0.5)
    try:
        await eventually(lambda: len(ids(svc)) == 4, what="first set")
        source = svc.membership.source
        refused = source.stats.refused
        write_members(members, [])
        await eventually(lambda: source.stats.refused > refused, what="empty set refused")
        refused = source.stats.refused
        write_members(members, bs[:1])  # drops 3 of 4 > 0.5
        await eventually(lambda: source.stats.refused > refused, what="large drop refused")
        assert len(ids(svc)) == 4
        write_members(members, bs[:2])  # drops 2 of 4: allowed
        await eventually(lambda: ids(svc) == {"app-0", "app-1"}, what="two left")
    finally:
        await svc.stop()


async def test_two_proxies_fed_one_source_route_every_key_alike(backends, tmp_path):
    bs = await backends("app-0", "app-1", "app-2")
    members = tmp_path / "members.json"
    write_members(members, bs)
    one = await start(tmp_path, members, name="one.toml")
    two = await start(tmp_path, members, name="two.toml")
    try:
        await eventually(lambda: len(ids(one)) == 3 and len(ids(two)) == 3, what="both")
        assert one.table.router.fingerprint == two.table.router.fingerprint
        assert await owners(one) == await owners(two)
    finally:
        await one.stop()
        await two.stop()


async def test_static_backends_and_discovery_together_are_a_config_error(tmp_path):
    from stickyproxy.config import ConfigError

    text = build_toml([], {}) + (
        '\n[discovery.file]\npath = "m.json"\n[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n'
    )
    with pytest.raises(ConfigError, match=r"backends: give \[\[backends\]\] or \[discovery\]"):
        loads(text)


async def test_metrics_show_the_ring_fingerprint_and_the_discovery_counts(backends, tmp_path):
    from prometheus_client import generate_latest

    bs = await backends("app-0", "app-1")
    members = tmp_path / "members.json"
    write_members(members, bs)
    svc = await start(tmp_path, members)
    try:
        await eventually(lambda: len(ids(svc)) == 2, what="first set")
        write_members(members, [])  # refused: empty
        source = svc.membership.source
        await eventually(lambda: source.stats.refusing, what="refusing")
        text = generate_latest(await svc.metrics_registry()).decode()
        fp = svc.table.router.fingerprint
        assert f'stickyproxy_ring_info{{fingerprint="{fp}"}} 1.0' in text
        assert "stickyproxy_ring_members 2.0" in text
        assert "stickyproxy_discovery_applied_total 1.0" in text
        assert "stickyproxy_discovery_refused_total 1.0" in text
        assert "stickyproxy_discovery_refusing 1.0" in text
        # a sample, not only the family's HELP line (printed even with no sample)
        assert re.search(r"^stickyproxy_resolver_lookups_total \d", text, re.M), text
    finally:
        await svc.stop()
