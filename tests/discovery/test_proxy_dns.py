"""The proxy with DNS discovery against a real dnsmasq: two `stickyproxy run` processes fed
one SRV name route every key alike, through a scale-up under load with no failed request;
and a DNS server that turns slow does not mark healthy backends down."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from stickyproxy.config import loads
from stickyproxy.control.server import Service

from .conftest import LOCALHOST, free_port

pytestmark = pytest.mark.slow

USERS = [f"user-{i}" for i in range(300)]
SRV = "_http._tcp.app.test"


def proxy_toml(port: int, dns: str, *, settle: str = "0s") -> str:
    return f"""
[listen]
host = "{LOCALHOST}"
port = {port}
[admin]
enabled = false
[health]
enabled = false
[logging]
level = "warning"
[discovery]
settle = "{settle}"
[discovery.dns]
name = "{SRV}"
nameservers = ["{dns}"]
interval_min = "0.2s"
interval_max = "1s"
timeout = "0.5s"
strip_suffix = ".test"
"""


def serve_srv(dnsmasq, backends) -> None:
    dnsmasq.srv = [(SRV, f"{b.id}.test", b.port, 10, 10) for b in backends]
    dnsmasq.hosts = [(LOCALHOST, f"{b.id}.test") for b in backends]
    dnsmasq.apply()


async def wait_for(predicate, what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {deadline}s")
        await asyncio.sleep(0.05)


async def spawn_proxy(tmp_path: Path, i: int, dns: str, ports: list[int]) -> subprocess.Popen:
    """`stickyproxy run` on a free port; a port taken between the choice and the bind (other
    work on this machine) is chosen again."""
    for attempt in range(5):
        port = free_port()
        cfg = tmp_path / f"p{i}.toml"
        cfg.write_text(proxy_toml(port, dns))
        proc = subprocess.Popen(
            [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"p{i}-{attempt}.log", "wb"),
        )
        end = time.monotonic() + 15
        while time.monotonic() < end and proc.poll() is None:
            try:
                with socket.create_connection((LOCALHOST, port), timeout=0.2):
                    ports.append(port)
                    return proc
            except OSError:
                await asyncio.sleep(0.05)
        proc.kill()
        proc.wait()
    raise AssertionError("no proxy process could listen")


async def owners(session: aiohttp.ClientSession, port: int) -> dict[str, str]:
    out = {}
    for u in USERS:
        async with session.get(f"http://{LOCALHOST}:{port}/", headers={"X-User-Id": u}) as r:
            out[u] = r.headers.get("X-Backend", f"status {r.status}")
            await r.read()
    return out


async def test_two_processes_fed_one_srv_name_agree_through_a_scale_up(
    backends, dnsmasq, tmp_path: Path
):
    bs = await backends("app-0", "app-1", "app-2", "app-3")
    dnsmasq.start()
    serve_srv(dnsmasq, bs[:3])
    procs: list[subprocess.Popen] = []
    ports: list[int] = []
    for i in range(2):
        procs.append(await spawn_proxy(tmp_path, i, dnsmasq.address, ports))
    try:
        async with aiohttp.ClientSession() as s:

            async def both_have(n: int) -> bool:
                try:
                    got = [set((await owners(s, p)).values()) for p in ports]
                except aiohttp.ClientError:
                    return False
                return all(len(g) == n and not any(x.startswith("status") for x in g) for g in got)

            await wait_for(lambda: both_have(3), "both proxies route to three backends")
            first = [await owners(s, p) for p in ports]
            assert first[0] == first[1]

            failed: list[str] = []
            stop = asyncio.Event()

            async def load(port: int) -> None:
                i = 0
                while not stop.is_set() and i < 20000:
                    u = USERS[i % len(USERS)]
                    i += 1
                    async with s.get(f"http://{LOCALHOST}:{port}/", headers={"X-User-Id": u}) as r:
                        await r.read()
                        if r.status != 200:
                            failed.append(f"{port} {u} {r.status}")

            tasks = [asyncio.create_task(load(p)) for p in ports]
            serve_srv(dnsmasq, bs)  # scale up to four
            await wait_for(lambda: both_have(4), "both proxies route to four backends")
            stop.set()
            await asyncio.gather(*tasks)
            assert failed == []
            second = [await owners(s, p) for p in ports]
            assert second[0] == second[1]
            moved = [u for u in USERS if first[0][u] != second[0][u]]
            # consistent hashing: only users now owned by the new member moved
            assert moved and all(second[0][u] == "app-3" for u in moved)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


async def test_a_slow_dns_server_does_not_mark_healthy_backends_down(
    backends, dnsmasq, delaying_relay, tmp_path
):
    bs = await backends("app-0", "app-1")
    dnsmasq.hosts = [(LOCALHOST, f"{b.id}.test") for b in bs]
    dnsmasq.start()
    text = f"""
[listen]
host = "{LOCALHOST}"
port = 0
[admin]
enabled = false
[health]
interval = "500ms"
timeout = "400ms"
fall = 2
[resolver]
nameservers = ["{LOCALHOST}:{delaying_relay.port}"]
timeout = "500ms"
min_ttl = "0s"
max_ttl = "1s"
[logging]
level = "warning"
""" + "".join(f'[[backends]]\nid = "{b.id}"\nurl = "http://{b.id}.test:{b.port}"\n' for b in bs)
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    svc = Service(loads(text, str(path)), str(path))
    await svc.start()
    try:
        async with aiohttp.ClientSession() as s:
            for b in bs:  # names answered while DNS is fast
                async with s.get(
                    f"http://{LOCALHOST}:{svc.proxy.port}/", headers={"X-User-Id": b.id}
                ) as r:
                    assert r.status == 200
            delaying_relay.delay = 2.0  # the DNS server now takes 2 s per answer
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                assert all(st.healthy for st in svc.table.states.values()), {
                    bid: st.reason for bid, st in svc.table.states.items()
                }
                async with s.get(
                    f"http://{LOCALHOST}:{svc.proxy.port}/", headers={"X-User-Id": "u"}
                ) as r:
                    assert r.status == 200
                await asyncio.sleep(0.05)  # pacing a bounded probe loop
            assert svc.proxy.resolver.stats.stale > 0  # served while refreshing
    finally:
        await svc.stop()
