"""The DNS source against a real dnsmasq whose records the tests change."""

from __future__ import annotations

import asyncio
import time

import pytest

from stickyproxy.config import Backend
from stickyproxy.discovery import DnsSource, parse_discovery

from .conftest import CHANGE_DEADLINE, Dnsmasq, Watching

NAME = "_http._tcp.app.test"


def source(server: str, **dns) -> DnsSource:
    raw_dns = {
        "name": NAME,
        "nameservers": [server],
        "interval_min": "100ms",
        "interval_max": "1s",
        "timeout": "500ms",
    }
    settle = dns.pop("settle", "300ms")
    share = dns.pop("max_drop_share", 0.5)
    raw_dns.update(dns)
    return DnsSource(parse_discovery({"settle": settle, "max_drop_share": share, "dns": raw_dns}))


def pods(d: Dnsmasq, n: int, weight: int = 10, first: int = 0) -> None:
    """A StatefulSet of n pods behind a headless Service, as SRV + A records."""
    d.srv = [(NAME, f"web-{i}.app.test", 8080, 0, weight) for i in range(first, first + n)]
    d.hosts = [(f"127.0.0.{10 + i}", f"web-{i}.app.test") for i in range(first, first + n)]


def ids(*n: int) -> tuple[str, ...]:
    return tuple(f"web-{i}.app.test" for i in n)


async def test_srv_first_set_ids_from_targets_and_addresses_from_the_answer(dnsmasq):
    pods(dnsmasq, 3)
    dnsmasq.start()
    poll = await source(dnsmasq.address).poll()
    assert poll.error == "" and poll.problems == ()
    assert poll.backends == tuple(
        Backend(f"web-{i}.app.test", f"http://127.0.0.{10 + i}:8080", 1, f"127.0.0.{10 + i}", 8080)
        for i in range(3)
    )


async def test_srv_target_addresses_asked_when_not_in_the_additional_section(dnsmasq):
    # dnsmasq adds A records for targets it holds; targets held only as CNAMEs are asked.
    dnsmasq.srv = [(NAME, "alias.app.test", 8080, 0, 1)]
    dnsmasq.extra = ["cname=alias.app.test,web-0.app.test"]
    dnsmasq.hosts = [("127.0.0.10", "web-0.app.test")]
    dnsmasq.start()
    poll = await source(dnsmasq.address).poll()
    assert [(b.id, b.host) for b in poll.backends] == [("alias.app.test", "127.0.0.10")]


@pytest.mark.slow
async def test_scale_up_and_down_seen_within_the_interval(dnsmasq):
    pods(dnsmasq, 2)
    dnsmasq.start()
    src = source(dnsmasq.address)
    async with Watching(src) as w:
        assert await w.next() == ids(0, 1)
        pods(dnsmasq, 3)
        dnsmasq.apply()
        t0 = time.monotonic()
        assert await w.next() == ids(0, 1, 2)
        # TTL 1 s (interval_max 1 s) + settle 0.3 s + one confirming round
        assert time.monotonic() - t0 < 1.0 + 0.3 + 1.0 + 1.0
        pods(dnsmasq, 2)
        dnsmasq.apply()
        assert await w.next() == ids(0, 1)
    assert src.stats.applied == 3 and src.stats.refused == 0


@pytest.mark.slow
async def test_an_emptied_record_set_is_never_applied(dnsmasq):
    pods(dnsmasq, 3)
    dnsmasq.start()
    src = source(dnsmasq.address)
    async with Watching(src) as w:
        assert await w.next() == ids(0, 1, 2)
        dnsmasq.srv, dnsmasq.hosts = [], []  # NXDOMAIN: the Service is being recreated
        dnsmasq.apply()
        await w.rounds(6)  # well past settle (0.3 s)
        assert src.stats.refusing and src.stats.refused == 1
        assert src.current and [b.id for b in src.current] == list(ids(0, 1, 2))
        pods(dnsmasq, 3)
        dnsmasq.apply()
        await w.rounds(3)
        assert not src.stats.refusing
    assert w.applied.empty()


@pytest.mark.slow
async def test_a_server_that_stops_answering_changes_nothing(dnsmasq):
    pods(dnsmasq, 2)
    dnsmasq.start()
    src = source(dnsmasq.address)
    async with Watching(src) as w:
        assert await w.next() == ids(0, 1)
        dnsmasq.stop()
        await w.rounds(3)
        assert src.stats.failures >= 3 and src.stats.last_error
        assert [b.id for b in src.current] == list(ids(0, 1))
    assert w.applied.empty()


@pytest.mark.slow
async def test_dropping_more_than_max_drop_share_is_refused_and_a_smaller_step_applies(dnsmasq):
    pods(dnsmasq, 4)
    dnsmasq.start()
    src = source(dnsmasq.address)
    async with Watching(src) as w:
        assert await w.next() == ids(0, 1, 2, 3)
        pods(dnsmasq, 1)  # 3 of 4 gone: 75% > 50%
        dnsmasq.apply()
        async with asyncio.timeout(CHANGE_DEADLINE):
            while not src.stats.refusing:
                await asyncio.sleep(0.02)
        await w.rounds(3)
        assert w.applied.empty() and src.stats.refused == 1
        assert [b.id for b in src.current] == list(ids(0, 1, 2, 3))
        pods(dnsmasq, 2)  # 2 of 4 gone: 50%, allowed
        dnsmasq.apply()
        assert await w.next() == ids(0, 1)


async def test_ttl_decides_the_next_query_within_the_bounds(dnsmasq):
    pods(dnsmasq, 1)
    cases = [  # (record TTL, interval_min, interval_max, expected delay)
        (1, "100ms", "60s", 1.0),
        (30, "100ms", "60s", 30.0),
        (30, "100ms", "10s", 10.0),
        (1, "5s", "60s", 5.0),
    ]
    for ttl, lo, hi, expected in cases:
        dnsmasq.ttl = ttl
        dnsmasq.stop()
        dnsmasq.start()
        poll = await source(dnsmasq.address, interval_min=lo, interval_max=hi).poll()
        assert poll.backends and poll.delay == expected, (ttl, lo, hi, poll)


async def test_a_records_ids_from_ptr_names_and_hosts_reloaded_on_sighup(dnsmasq):
    dnsmasq.hosts = [
        ("127.0.0.10", "web-0.app.test"),
        ("127.0.0.11", "web-1.app.test"),
        ("127.0.0.10", "app.test"),
        ("127.0.0.11", "app.test"),
    ]
    dnsmasq.start()
    src = source(dnsmasq.address, name="app.test", type="A", port=9000, strip_suffix=".app.test")
    poll = await src.poll()
    assert [(b.id, b.url) for b in poll.backends] == [
        ("web-0", "http://127.0.0.10:9000"),
        ("web-1", "http://127.0.0.11:9000"),
    ]
    # web-1 restarts elsewhere: same id, new address (the ring does not change)
    dnsmasq.hosts = [
        ("127.0.0.10", "web-0.app.test"),
        ("127.0.0.17", "web-1.app.test"),
        ("127.0.0.10", "app.test"),
        ("127.0.0.17", "app.test"),
    ]
    dnsmasq.apply()
    async with asyncio.timeout(5):
        while True:
            poll = await src.poll()
            # (while dnsmasq re-reads its hosts an answer may be partial: the guard's job)
            if poll.backends and [b.host for b in poll.backends][-1:] == ["127.0.0.17"]:
                break
            await asyncio.sleep(0.05)
    assert [b.id for b in poll.backends] == ["web-0", "web-1"]


async def test_an_address_without_a_ptr_name_is_left_out_not_named_by_its_address(dnsmasq):
    dnsmasq.hosts = [("127.0.0.10", "web-0.app.test")]
    dnsmasq.extra = ["address=/app.test/127.0.0.10", "address=/app.test/127.0.0.50"]
    dnsmasq.start()
    poll = await source(dnsmasq.address, name="app.test", type="A", port=80).poll()
    assert [b.id for b in poll.backends] == ["web-0.app.test"]
    assert poll.problems == ("address 127.0.0.50: no PTR name, left out (ids are never addresses)",)


async def test_a_silent_server_is_bounded_by_the_timeout_and_blocks_no_other_source(
    dnsmasq, silent_dns
):
    pods(dnsmasq, 2)
    dnsmasq.start()
    stuck = source(silent_dns, timeout="600ms")
    fine = source(dnsmasq.address)
    t0 = time.monotonic()
    slow_task = asyncio.get_running_loop().create_task(stuck.poll())
    good = await fine.poll()
    assert good.backends and time.monotonic() - t0 < 0.55  # before the other timed out
    assert not slow_task.done()
    bad = await slow_task
    elapsed = time.monotonic() - t0
    assert bad.backends is None and "0.6s" in bad.error, bad.error
    assert 0.5 < elapsed < 0.6 + 0.5, elapsed


async def test_dual_stack_members_are_one_member_each_and_ipv6_urls_are_bracketed(dnsmasq):
    dnsmasq.hosts = [
        ("127.0.0.10", "web-0.app.test"),
        ("fd00::10", "web-0.app.test"),
        ("fd00::11", "web-1.app.test"),
        ("127.0.0.10", "app.test"),
        ("fd00::10", "app.test"),
        ("fd00::11", "app.test"),
    ]
    dnsmasq.start()
    poll = await source(dnsmasq.address, name="app.test", type="A+AAAA", port=9000).poll()
    assert [(b.id, b.url, b.host) for b in poll.backends] == [
        ("web-0.app.test", "http://127.0.0.10:9000", "127.0.0.10"),
        ("web-1.app.test", "http://[fd00::11]:9000", "fd00::11"),
    ]
    only6 = await source(dnsmasq.address, name="app.test", type="AAAA", port=9000).poll()
    assert [(b.id, b.host) for b in only6.backends] == [
        ("web-0.app.test", "fd00::10"),
        ("web-1.app.test", "fd00::11"),
    ]


async def test_two_proxies_fed_the_same_answers_build_the_same_ring(dnsmasq):
    from stickyproxy.routing.ring import Member, Ring

    dnsmasq.srv = [(NAME, f"web-{i}.app.test", 8080, 0, 33) for i in (2, 0, 1)]
    dnsmasq.hosts = [(f"127.0.0.{10 + i}", f"web-{i}.app.test") for i in range(3)]
    dnsmasq.start()
    rings = []
    for _ in range(2):
        poll = await source(dnsmasq.address).poll()
        rings.append(Ring([Member(b.id, b.weight) for b in poll.backends]))
    assert rings[0].fingerprint == rings[1].fingerprint
    assert [rings[0].owner(f"user-{i}") for i in range(2000)] == [
        rings[1].owner(f"user-{i}") for i in range(2000)
    ]


def test_no_nameserver_configured_is_a_lookup_failure_naming_the_remedy(tmp_path):
    from stickyproxy.discovery.dns_source import LookupFailed, make_resolver

    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\n")
    with pytest.raises(LookupFailed, match="set nameservers"):
        make_resolver((), 1.0, str(conf))
    conf.write_text("nameserver 127.0.0.53\noptions ndots:2\n")
    r = make_resolver((), 1.0, str(conf))
    assert [str(getattr(n, "address", n)) for n in r.nameservers] == ["127.0.0.53"]


def test_the_source_and_the_resolver_run_on_uvloop(dnsmasq, tmp_path):
    """The proxy's loop is uvloop (dnspython's datagram endpoints must work there too)."""
    import uvloop

    from stickyproxy.discovery import HostResolver, parse_resolver

    pods(dnsmasq, 2)
    dnsmasq.start()

    async def both():
        poll = await source(dnsmasq.address).poll()
        (tmp_path / "hosts").write_text("")
        hr = HostResolver(
            parse_resolver({"nameservers": [dnsmasq.address]}), hosts_file=str(tmp_path / "hosts")
        )
        try:
            return poll, await hr.resolve("web-1.app.test")
        finally:
            await hr.close()

    loop = uvloop.new_event_loop()
    try:
        poll, addrs = loop.run_until_complete(asyncio.wait_for(both(), 5))
    finally:
        loop.close()
    assert [b.id for b in poll.backends] == list(ids(0, 1)) and addrs == ["127.0.0.11"]


async def test_a_step_the_reload_path_refuses_is_offered_again(dnsmasq):
    from stickyproxy.config import ConfigError

    pods(dnsmasq, 2)
    dnsmasq.start()
    src = source(dnsmasq.address)
    calls = []

    async def refuse_once(backends):
        calls.append(backends)
        if len(calls) == 1:
            raise ConfigError(["backends: refused for the test"])

    await src.step(refuse_once)
    assert src.stats.apply_failures == 1 and src.current == ()
    await src.step(refuse_once)
    assert src.stats.applied == 1 and [b.id for b in src.current] == list(ids(0, 1))
    assert calls[0] == calls[1]
