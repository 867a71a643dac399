"""The cached host resolver against a real dnsmasq behind a relay that can delay answers.

The reproduction first: a resolver asked on every new connection (what the loop's default
resolver does) behind a DNS server that answers in 2 s makes a health check of a *healthy*
backend time out. Then the same check through ``HostResolver`` passes, served from its cache.
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import dns.asyncresolver
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from stickyproxy.discovery import HostResolver, ResolveError, parse_resolver
from stickyproxy.discovery.dns_source import make_resolver, query

from .conftest import LOCALHOST

# The slow server: answers this long after the question (the issue saw seconds).
DNS_DELAY = 2.0
# The health check's bound (health.timeout), shorter than the slow server's delay.
CHECK_TIMEOUT = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver_for(relay, clock: Clock, tmp_path, **raw) -> HostResolver:
    raw = {
        "nameservers": [f"{LOCALHOST}:{relay.port}"],
        "timeout": "500ms",
        "min_ttl": "1s",
        "max_ttl": "1m",
        **raw,
    }
    hosts = tmp_path / "hosts.empty"
    hosts.write_text("")
    return HostResolver(parse_resolver(raw), hosts_file=str(hosts), clock=clock)


def serve(dnsmasq, mapping: dict[str, str]) -> None:
    dnsmasq.hosts = [(a, n) for n, a in mapping.items()]


@pytest.fixture
async def healthy_backend():
    """An aiohttp backend answering 200 on 127.0.0.10 (any 127/8 address is loopback)."""
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.10", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port
    finally:
        await runner.cleanup()


class AskEveryTime(AbstractResolver):
    """Asks the server on every connection and keeps nothing, as the default resolver does."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.r = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        a = await query(self.r, host, "A", 10.0)
        assert a is not None and a.rrset is not None
        return [
            ResolveResult(
                hostname=host,
                host=r.address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for r in a.rrset
        ]

    async def close(self) -> None:
        return None


async def check(resolver: AbstractResolver, port: int) -> float:
    """One health check of web-0.app.test (a GET with health.timeout); its duration."""
    conn = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.monotonic()
        async with s.get(
            f"http://web-0.app.test:{port}/", timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
        ) as resp:
            assert resp.status == 200
            await resp.read()
        return time.monotonic() - t0


async def test_reproduction_a_slow_dns_server_fails_checks_of_healthy_backends(
    dnsmasq, delaying_relay, healthy_backend
):
    serve(dnsmasq, {"web-0.app.test": "127.0.0.10"})
    dnsmasq.start()
    every_time = AskEveryTime(make_resolver([(LOCALHOST, delaying_relay.port)], 10.0))
    assert await check(every_time, healthy_backend) < CHECK_TIMEOUT  # fast DNS: healthy
    delaying_relay.delay = DNS_DELAY
    with pytest.raises(TimeoutError):  # slow DNS: "down"
        await check(every_time, healthy_backend)


async def test_the_cached_resolver_keeps_checks_of_healthy_backends_passing(
    dnsmasq, delaying_relay, healthy_backend, tmp_path
):
    serve(dnsmasq, {"web-0.app.test": "127.0.0.10"})
    dnsmasq.start()
    clock = Clock()
    hr = resolver_for(delaying_relay, clock, tmp_path)
    try:
        assert await check(hr.aiohttp(), healthy_backend) < CHECK_TIMEOUT
        delaying_relay.delay = DNS_DELAY
        clock.now += 120  # past max_ttl: every entry expired
        for _ in range(3):
            assert await check(hr.aiohttp(), healthy_backend) < 0.5
        assert hr.stats.stale == 3
    finally:
        await hr.close()


async def test_a_slow_server_delays_no_known_host_and_bounds_a_new_one(
    dnsmasq, delaying_relay, tmp_path
):
    serve(
        dnsmasq,
        {
            "web-0.app.test": "127.0.0.10",
            "web-1.app.test": "127.0.0.11",
            "web-2.app.test": "127.0.0.12",
        },
    )
    dnsmasq.start()
    clock = Clock()
    hr = resolver_for(delaying_relay, clock, tmp_path)
    try:
        assert await hr.resolve("web-0.app.test") == ["127.0.0.10"]
        assert await hr.resolve("WEB-1.app.test.") == ["127.0.0.11"]
        delaying_relay.delay = DNS_DELAY
        clock.now += 120
        t0 = time.monotonic()
        new_host = asyncio.get_running_loop().create_task(hr.resolve("web-2.app.test"))
        # while web-2 waits on the slow server, the known hosts answer at once
        assert await hr.resolve("web-0.app.test") == ["127.0.0.10"]
        assert await hr.resolve("web-1.app.test") == ["127.0.0.11"]
        assert time.monotonic() - t0 < 0.3  # not the 0.5 s bound, not the 2 s delay
        assert hr.cached("web-0.app.test") == ["127.0.0.10"]
        assert hr.cached("web-2.app.test") is None
        with pytest.raises(ResolveError, match="within 0.5s"):
            await new_host
        assert 0.4 < time.monotonic() - t0 < 0.5 + 0.4
        # the background refreshes of web-0 and web-1 fail too; what was known is still served
        async with asyncio.timeout(2):
            while hr.stats.failures < 3:
                await asyncio.sleep(0.02)
        assert set(hr.stats.hosts) == {"web-0.app.test", "web-1.app.test", "web-2.app.test"}
        assert await hr.resolve("web-0.app.test") == ["127.0.0.10"]
    finally:
        await hr.close()


async def test_an_expired_answer_is_refreshed_in_the_background(dnsmasq, delaying_relay, tmp_path):
    serve(dnsmasq, {"web-0.app.test": "127.0.0.10"})
    dnsmasq.start()
    clock = Clock()
    hr = resolver_for(delaying_relay, clock, tmp_path)
    try:
        assert await hr.resolve("web-0.app.test") == ["127.0.0.10"]
        serve(dnsmasq, {"web-0.app.test": "127.0.0.20"})  # the pod moved
        dnsmasq.apply()
        clock.now += 0.5
        assert await hr.resolve("web-0.app.test") == ["127.0.0.10"]  # fresh: no question
        clock.now += 120
        async with asyncio.timeout(5):
            while hr.cached("web-0.app.test") != ["127.0.0.20"]:
                clock.now += 120  # until dnsmasq re-read its hosts
                await asyncio.sleep(0.05)
    finally:
        await hr.close()


async def test_concurrent_callers_share_one_lookup_and_a_failure_is_remembered(
    dnsmasq, delaying_relay, tmp_path
):
    serve(dnsmasq, {"web-0.app.test": "127.0.0.10"})
    dnsmasq.start()
    clock = Clock()
    hr = resolver_for(delaying_relay, clock, tmp_path)
    try:
        got = await asyncio.gather(*(hr.resolve("web-0.app.test") for _ in range(20)))
        assert got == [["127.0.0.10"]] * 20
        assert delaying_relay.queries == 2  # one A, one AAAA
        with pytest.raises(ResolveError, match="no address"):
            await hr.resolve("missing.app.test")
        asked = delaying_relay.queries
        with pytest.raises(ResolveError, match="no address"):
            await hr.resolve("missing.app.test")
        assert delaying_relay.queries == asked  # remembered for min_ttl
        clock.now += 1.5
        with pytest.raises(ResolveError):
            await hr.resolve("missing.app.test")
        assert delaying_relay.queries > asked
    finally:
        await hr.close()


async def test_an_answer_past_stale_for_is_asked_again_and_bounded(
    dnsmasq, delaying_relay, tmp_path
):
    serve(dnsmasq, {"web-0.app.test": "127.0.0.10"})
    dnsmasq.start()
    clock = Clock()
    hr = resolver_for(delaying_relay, clock, tmp_path, stale_for="10m")
    try:
        await hr.resolve("web-0.app.test")
        delaying_relay.delay = DNS_DELAY
        clock.now += 3600
        assert hr.cached("web-0.app.test") is None
        with pytest.raises(ResolveError):
            await hr.resolve("web-0.app.test")
    finally:
        await hr.close()


async def test_hosts_file_first_literals_as_they_are_and_localhost(silent_dns, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.1.2.3 web-9.internal\n")
    clock = Clock()
    hr = HostResolver(
        parse_resolver({"nameservers": [silent_dns], "timeout": "200ms"}),
        hosts_file=str(hosts),
        clock=clock,
    )
    try:
        assert await hr.resolve("web-9.internal") == ["10.1.2.3"]
        assert await hr.resolve("127.0.0.5") == ["127.0.0.5"]
        assert await hr.resolve("[::1]") == ["::1"]
        assert await hr.resolve("localhost") == ["127.0.0.1", "::1"]
        hosts.write_text("10.1.2.4 web-9.internal\n")  # edited: seen after min_ttl
        assert await hr.resolve("web-9.internal") == ["10.1.2.3"]
        clock.now += 1.5
        async with asyncio.timeout(2):
            while await hr.resolve("web-9.internal") != ["10.1.2.4"]:
                await asyncio.sleep(0.02)
        assert hr.stats.lookups == 0  # the silent server was never asked
    finally:
        await hr.close()
