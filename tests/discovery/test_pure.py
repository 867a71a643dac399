"""Pure parts of discovery, table-tested: settings, ids and weights from records, the
membership guard, the backends-file parser, hosts(5) parsing."""

from __future__ import annotations

import pytest

from stickyproxy.config import Backend, ConfigError
from stickyproxy.discovery import (
    APPLY,
    REFUSE,
    UNCHANGED,
    WAIT,
    MembershipGuard,
    parse_backends,
    parse_discovery,
    parse_resolver,
)
from stickyproxy.discovery.records import (
    SrvRecord,
    address_backends,
    host_id,
    normalise_weights,
    srv_backends,
)
from stickyproxy.discovery.resolver import parse_hosts
from stickyproxy.discovery.settings import DnsSettings

# -- settings ----------------------------------------------------------------------------


def errors_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_discovery(raw)
    return e.value.errors


def test_defaults_of_a_dns_source():
    s = parse_discovery({"dns": {"name": "_http._tcp.App.ns.svc.cluster.local."}})
    assert s.source == "dns" and s.file is None
    assert s.settle == 10.0 and s.max_drop_share == 0.5
    d = s.dns
    assert d.name == "_http._tcp.app.ns.svc.cluster.local"
    assert (d.type, d.scheme, d.interval_min, d.interval_max, d.timeout) == (
        "SRV",
        "http",
        5.0,
        60.0,
        2.0,
    )
    assert d.nameservers == () and d.id == "host" and d.weights == "srv"


def test_a_full_dns_source():
    s = parse_discovery(
        {
            "settle": "3s",
            "max_drop_share": 0.25,
            "dns": {
                "name": "app",
                "type": "A+AAAA",
                "port": 8080,
                "nameservers": ["127.0.0.1:8600", "[::1]:53", "10.0.0.10"],
                "interval_min": "1s",
                "interval_max": "30s",
                "timeout": "500ms",
                "strip_suffix": "app.test",
            },
        }
    )
    assert s.settle == 3.0 and s.max_drop_share == 0.25
    assert s.dns.nameservers == (("127.0.0.1", 8600), ("::1", 53), ("10.0.0.10", 53))
    assert s.dns.weights == "equal" and s.dns.strip_suffix == ".app.test"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({}, "discovery: set exactly one source, [discovery.dns] or [discovery.file]"),
        ({"dns": {"name": "x"}, "file": {"path": "/b.json"}}, "discovery: set exactly one source"),
        ({"dns": {}}, "discovery.dns.name: missing"),
        ({"dns": {"name": "a..b"}}, "discovery.dns.name: not a DNS name"),
        (
            {"dns": {"name": "x", "type": "MX"}},
            "discovery.dns.type: must be one of 'SRV', 'A', 'AAAA', 'A+AAAA'",
        ),
        ({"dns": {"name": "x", "type": "A"}}, "discovery.dns.port: required when type is 'A'"),
        (
            {"dns": {"name": "x", "type": "A", "port": 0}},
            "discovery.dns.port: must be between 1 and 65535",
        ),
        ({"dns": {"name": "x", "port": 80}}, 'discovery.dns.port: not used with type "SRV"'),
        (
            {"dns": {"name": "x", "type": "AAAA", "port": 80, "weights": "srv"}},
            "discovery.dns.weights:",
        ),
        ({"dns": {"name": "x", "type": "A", "port": 80, "id": "host-port"}}, "discovery.dns.id:"),
        (
            {"dns": {"name": "x", "interval_min": "2m", "interval_max": "1m"}},
            "discovery.dns.interval_min: must not exceed discovery.dns.interval_max",
        ),
        ({"dns": {"name": "x", "timeout": 2}}, "discovery.dns.timeout: expected a duration string"),
        (
            {"dns": {"name": "x", "nameservers": ["dns.example"]}},
            "discovery.dns.nameservers: not an IP address",
        ),
        (
            {"dns": {"name": "x", "nameservers": "10.0.0.1"}},
            "discovery.dns.nameservers: expected a list",
        ),
        ({"dns": {"name": "x", "scheme": "https"}}, "discovery.dns.scheme: must be one of 'http'"),
        ({"dns": {"name": "x", "ttl": "1s"}}, "discovery.dns.ttl: unknown key"),
        (
            {"dns": {"name": "x"}, "max_drop_share": 1.5},
            "discovery.max_drop_share: must be between 0 and 1",
        ),
        ({"dns": {"name": "x"}, "settle": "soon"}, "discovery.settle: not a duration"),
        ({"file": {}}, "discovery.file.path: missing"),
        (
            {"file": {"path": "/b.json", "interval": "1ms"}},
            "discovery.file.interval: must be at least 0.05s",
        ),
        ({"dns": "x"}, "discovery.dns: expected a table"),
    ],
)
def test_errors_name_the_key_path(raw, expected):
    assert any(e.startswith(expected) for e in errors_of(raw)), errors_of(raw)


def test_every_error_at_once_and_into_a_callers_list():
    errs: list[str] = []
    parse_discovery({"settle": 1, "dns": {"type": "A"}}, "x.discovery", errs)
    assert [e.split(":")[0] for e in errs] == [
        "x.discovery.settle",
        "x.discovery.dns.name",
        "x.discovery.dns.port",
    ]


def test_resolver_settings():
    r = parse_resolver({})
    assert (r.timeout, r.min_ttl, r.max_ttl, r.stale_for) == (1.0, 1.0, 300.0, 3600.0)
    with pytest.raises(ConfigError, match=r"resolver.min_ttl: must not exceed resolver.max_ttl"):
        parse_resolver({"min_ttl": "10m", "max_ttl": "1m"})


# -- ids and weights ---------------------------------------------------------------------

SRV = DnsSettings(name="_http._tcp.app.test")


@pytest.mark.parametrize(
    "name, suffix, port, expected",
    [
        ("web-0.app.test.", "", None, "web-0.app.test"),
        ("WEB-0.App.Test", "", None, "web-0.app.test"),  # RFC 4343
        ("web-0.app.ns.svc.cluster.local.", ".app.ns.svc.cluster.local", None, "web-0"),
        ("node1.node.dc1.consul.", ".consul", 21000, "node1.node.dc1-21000"),
        ("app.test", ".app.test", None, "app.test"),  # never stripped to nothing
    ],
)
def test_host_id(name, suffix, port, expected):
    assert host_id(name, suffix, port) == expected


def test_a_host_name_too_long_for_an_id_is_refused_with_the_remedy():
    with pytest.raises(ValueError, match="set strip_suffix"):
        host_id("web-0." + "x" * 60 + ".svc.cluster.local")


@pytest.mark.parametrize(
    "weights, expected",
    [
        ([33, 33, 33], [1, 1, 1]),  # CoreDNS: 100/n each
        ([25, 25, 25, 25], [1, 1, 1, 1]),
        ([10, 20, 30], [1, 2, 3]),
        ([0, 0], [1, 1]),  # RFC 2782 weight 0: the smallest share
        ([0, 100], [1, 100]),
        ([1, 65535], [1, 100]),  # scaled to MAX_WEIGHT
        ([], []),
    ],
)
def test_normalise_weights(weights, expected):
    assert normalise_weights(weights) == expected


def srv(target, port=8080, weight=10, priority=0):
    return SrvRecord(priority, weight, port, target)


ADDRS = {
    "web-0.app.test": ["127.0.0.10"],
    "web-1.app.test": ["::1", "127.0.0.11"],
    "web-2.app.test": ["127.0.0.12"],
    "backup.app.test": ["127.0.0.99"],
}


def ids(backends):
    return [b.id for b in backends]


def test_srv_members_ids_from_targets_sorted_whatever_the_record_order():
    a, _ = srv_backends([srv("web-1.app.test."), srv("web-0.app.test.")], ADDRS, SRV)
    b, _ = srv_backends([srv("web-0.app.test."), srv("WEB-1.app.test.")], ADDRS, SRV)
    assert a == b
    assert a == (
        Backend("web-0.app.test", "http://127.0.0.10:8080", 1, "127.0.0.10", 8080),
        Backend("web-1.app.test", "http://127.0.0.11:8080", 1, "127.0.0.11", 8080),
    )


def test_srv_only_the_lowest_priority_and_not_the_root_target():
    got, _ = srv_backends(
        [
            srv("backup.app.test.", priority=10),
            srv("web-0.app.test.", priority=1),
            srv(".", priority=0),
        ],
        ADDRS,
        SRV,
    )
    assert ids(got) == ["web-0.app.test"]
    assert srv_backends([srv(".")], ADDRS, SRV) == ((), [])


def test_srv_weights_and_the_equal_mode():
    recs = [srv("web-0.app.test.", weight=20), srv("web-1.app.test.", weight=40)]
    assert [b.weight for b in srv_backends(recs, ADDRS, SRV)[0]] == [1, 2]
    eq = DnsSettings(name="x", weights="equal")
    assert [b.weight for b in srv_backends(recs, ADDRS, eq)[0]] == [1, 1]


def test_srv_same_host_two_ports():
    recs = [srv("web-0.app.test.", port=8081), srv("web-0.app.test.", port=8080)]
    got, problems = srv_backends(recs, ADDRS, SRV)
    assert [(b.id, b.port) for b in got] == [("web-0.app.test", 8080)]
    assert "host-port" in problems[0]
    hp = DnsSettings(name="x", id="host-port", strip_suffix=".app.test")
    got, problems = srv_backends(recs, ADDRS, hp)
    assert ids(got) == ["web-0-8080", "web-0-8081"] and not problems


def test_srv_target_without_address_is_left_out_and_said():
    got, problems = srv_backends([srv("web-0.app.test."), srv("gone.app.test.")], ADDRS, SRV)
    assert ids(got) == ["web-0.app.test"] and problems == ["SRV target gone.app.test: no address"]


def test_address_members_ids_from_ptr_names_never_addresses():
    a = DnsSettings(
        name="app.test", type="A+AAAA", port=9000, weights="equal", strip_suffix=".app.test"
    )
    got, problems = address_backends(
        {
            "127.0.0.10": "web-0.app.test.",
            "::1": "web-0.app.test.",
            "127.0.0.11": "WEB-1.app.test.",
            "127.0.0.12": None,
        },
        a,
    )
    assert got == (
        Backend("web-0", "http://127.0.0.10:9000", 1, "127.0.0.10", 9000),
        Backend("web-1", "http://127.0.0.11:9000", 1, "127.0.0.11", 9000),
    )
    assert problems == ["address 127.0.0.12: no PTR name, left out (ids are never addresses)"]
    six, _ = address_backends({"::2": "v6.app.test"}, a)
    assert six[0].url == "http://[::2]:9000" and six[0].host == "::2"


def test_a_member_that_moves_to_another_address_keeps_its_id():
    a = DnsSettings(name="app.test", type="A", port=80, weights="equal")
    before, _ = address_backends({"10.0.0.1": "web-0.app.test"}, a)
    after, _ = address_backends({"10.0.0.7": "web-0.app.test"}, a)
    assert ids(before) == ids(after) and before != after


# -- the membership guard ----------------------------------------------------------------


def members(*names, port=80):
    return tuple(Backend(n, f"http://{n}:{port}", 1, n, port) for n in names)


ABCD = members("a", "b", "c", "d")

# (time, observed set, expected action, expected current set after the caller applied)
GUARD_CASES = {
    "first set applies at once": [(0, ABCD, APPLY, ABCD)],
    "empty first set is refused": [(0, (), REFUSE, ())],
    "scale up settles then applies": [
        (0, ABCD, APPLY, ABCD),
        (1, members("a", "b", "c", "d", "e"), WAIT, ABCD),
        (5, members("a", "b", "c", "d", "e"), WAIT, ABCD),
        (11, members("a", "b", "c", "d", "e"), APPLY, members("a", "b", "c", "d", "e")),
    ],
    "a flapping answer restarts the settle time": [
        (0, ABCD, APPLY, ABCD),
        (1, members("a", "b", "c"), WAIT, ABCD),
        (8, members("a", "b", "c", "e"), WAIT, ABCD),
        (12, members("a", "b", "c", "e"), WAIT, ABCD),
        (18, members("a", "b", "c", "e"), APPLY, members("a", "b", "c", "e")),
    ],
    "a change that goes away is forgotten": [
        (0, ABCD, APPLY, ABCD),
        (1, members("a", "b"), WAIT, ABCD),
        (2, ABCD, UNCHANGED, ABCD),
        (12, members("a", "b"), WAIT, ABCD),
    ],
    "an empty answer is never applied, however long": [
        (0, ABCD, APPLY, ABCD),
        (1, (), REFUSE, ABCD),
        (100, (), REFUSE, ABCD),
    ],
    "dropping half is allowed at 0.5": [
        (0, ABCD, APPLY, ABCD),
        (1, members("a", "b"), WAIT, ABCD),
        (11, members("a", "b"), APPLY, members("a", "b")),
    ],
    "dropping three of four is refused and stays refused": [
        (0, ABCD, APPLY, ABCD),
        (1, members("a"), WAIT, ABCD),
        (11, members("a"), REFUSE, ABCD),
        (500, members("a"), REFUSE, ABCD),
    ],
    "a replacement counts its drops": [
        (0, ABCD, APPLY, ABCD),
        (1, members("e", "f", "g", "h"), WAIT, ABCD),
        (11, members("e", "f", "g", "h"), REFUSE, ABCD),
    ],
    "an address change of the same ids applies after settling": [
        (0, ABCD, APPLY, ABCD),
        (1, members("a", "b", "c", "d", port=81), WAIT, ABCD),
        (11, members("a", "b", "c", "d", port=81), APPLY, members("a", "b", "c", "d", port=81)),
    ],
}


@pytest.mark.parametrize("steps", list(GUARD_CASES.values()), ids=list(GUARD_CASES))
def test_guard(steps):
    g = MembershipGuard(settle=10.0, max_drop_share=0.5)
    for t, seen, action, after in steps:
        d = g.observe(t, seen)
        assert d.action == action, (t, d)
        if d.action == APPLY:
            g.applied(d.backends)
        assert g.current == after, t


def test_guard_refusal_is_first_once_per_candidate_and_a_failed_apply_is_retried():
    g = MembershipGuard(settle=0.0, max_drop_share=0.25, current=ABCD)
    firsts = [g.observe(t, members("a", "b")).first for t in range(3)]
    assert firsts == [True, False, False]
    assert g.observe(3, members("a")).first is True
    d = g.observe(4, members("a", "b", "c"))
    assert d.action == APPLY and d.removed == ("d",)
    # the caller's reload failed: nothing applied, the same step is offered again
    assert g.observe(5, members("a", "b", "c")).action == APPLY and g.current == ABCD


def test_guard_wait_says_how_long_is_left():
    g = MembershipGuard(settle=10.0, max_drop_share=0.5, current=ABCD)
    g.observe(100.0, members("a", "b", "c"))
    d = g.observe(104.0, members("a", "b", "c"))
    assert d.action == WAIT and d.wait == pytest.approx(6.0) and d.removed == ("d",)


# -- the backends file -------------------------------------------------------------------

B2 = (
    Backend("a", "http://127.0.0.1:8001", 1, "127.0.0.1", 8001),
    Backend("b", "http://127.0.0.1:8002", 3, "127.0.0.1", 8002),
)


@pytest.mark.parametrize(
    "name, text",
    [
        (
            "b.json",
            '[{"id": "a", "url": "http://127.0.0.1:8001"}, {"id": "b", "url": "http://127.0.0.1:8002", "weight": 3}]',
        ),
        (
            "b.json",
            '{"backends": [{"id": "a", "url": "http://127.0.0.1:8001"}, {"id": "b", "url": "http://127.0.0.1:8002", "weight": 3}]}',
        ),
        (
            "b.toml",
            '[[backends]]\nid = "a"\nurl = "http://127.0.0.1:8001"\n[[backends]]\nid = "b"\nurl = "http://127.0.0.1:8002"\nweight = 3\n',
        ),
        (
            "backends",
            ' [{"id": "a", "url": "http://127.0.0.1:8001"}, {"id": "b", "url": "http://127.0.0.1:8002", "weight": 3}]',
        ),
    ],
)
def test_backends_file_formats(name, text):
    assert parse_backends(text.encode(), f"/etc/x/{name}") == B2


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (
            "b.json",
            '[{"id": "a", "url": "http://127.0.0.1:8001"}, {"id": "b", "ur',
            "JSON syntax error",
        ),
        ("b.toml", '[[backends]]\nid = "a"\nurl = "http://127', "TOML syntax error"),
        (
            "b.json",
            '[{"id": "a", "url": "ftp://x"}]',
            "backends[0].url: not an http:// or https:// URL",
        ),
        (
            "b.json",
            '[{"id": "a", "url": "http://x:1"}, {"id": "a", "url": "http://y:1"}]',
            "backends[1].id: duplicate",
        ),
        (
            "b.json",
            '[{"id": "a", "url": "http://x:1", "weight": 0}]',
            "backends[0].weight: must be between 1 and 100",
        ),
        ("b.json", '{"servers": []}', "servers: unknown key"),
        ("b.toml", "x = 1", "x: unknown key"),
        ("b.json", "{}", "backends: missing"),
        ("b.json", '"a"', "backends: expected an array"),
    ],
)
def test_backends_file_refusals_name_the_file_and_the_entry(name, text, expected):
    with pytest.raises(ConfigError) as e:
        parse_backends(text.encode(), f"/etc/x/{name}")
    assert e.value.source == f"/etc/x/{name}"
    assert any(m.startswith(expected) for m in e.value.errors), e.value.errors


def test_backends_file_empty_list_is_an_empty_set():
    assert parse_backends(b"[]", "b.json") == ()


def test_backends_file_not_utf8():
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_backends(b"\xff\xfe[", "b.json")


# -- hosts(5) ----------------------------------------------------------------------------


def test_parse_hosts():
    text = (
        "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n# 10.0.0.1 off\n"
        "10.0.0.5 Web-0.App.Test web-0\nbad line\nfe80::1%eth0 ll\n"
    )
    assert parse_hosts(text) == {
        "localhost": ["127.0.0.1", "::1"],
        "ip6-localhost": ["::1"],
        "web-0.app.test": ["10.0.0.5"],
        "web-0": ["10.0.0.5"],
        "ll": ["fe80::1"],
    }


# -- the reference -----------------------------------------------------------------------


def test_docs_hold_every_key_with_its_default():
    from pathlib import Path

    from stickyproxy.discovery.settings import reference_tables

    doc = (Path(__file__).parents[2] / "docs" / "discovery.md").read_text()
    for table, rows in reference_tables().items():
        assert rows in doc, f"docs/discovery.md: the [{table}] table differs from the settings"
