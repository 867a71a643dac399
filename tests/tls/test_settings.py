"""The pure parts of stickyproxy.tls, table-tested: [listen.tls] and backend TLS parsing
(every error names its key path), SNI name selection, client identity from a decoded
certificate, the handshake gate's counting, file-change detection."""

from __future__ import annotations

import os

import pytest

from stickyproxy import tls
from stickyproxy.config import ConfigError


def parse(raw, base_dir="/etc/sp"):
    errors: list[str] = []
    out = tls.parse_listen_tls(raw, errors, base_dir=base_dir)
    return out, errors


def test_defaults_and_paths_joined_to_the_config_directory():
    s, errors = parse({"cert": "c.pem", "key": "k.pem"})
    assert errors == []
    assert s == tls.ListenTLS(cert="/etc/sp/c.pem", key="/etc/sp/k.pem")
    assert (s.min_version, s.alpn, s.client_auth) == ("1.2", ("http/1.1",), "none")
    assert s.handshake_timeout == tls.DEFAULT_HANDSHAKE_TIMEOUT
    assert s.max_handshakes == tls.DEFAULT_MAX_HANDSHAKES
    assert tls.identity_header(s) == "X-Sticky-Client-Cert"
    assert tls.identity_header(s, "X-Edge-") == "X-Edge-Client-Cert"
    assert parse(None) == (None, [])


@pytest.mark.parametrize(
    "raw, error",
    [
        ({"key": "k"}, "listen.tls.cert: required"),
        ({"cert": "c"}, "listen.tls.key: required"),
        (
            {"cert": "c", "key": "k", "min_version": "1.1"},
            "listen.tls.min_version: must be one of '1.2', '1.3'",
        ),
        (
            {"cert": "c", "key": "k", "alpn": ["spdy/3"]},
            "listen.tls.alpn: unknown protocol 'spdy/3'",
        ),
        (
            {"cert": "c", "key": "k", "alpn": ["h2", "h2"]},
            "listen.tls.alpn: lists a protocol twice",
        ),
        ({"cert": "c", "key": "k", "alpn": []}, "listen.tls.alpn: expected a non-empty list"),
        (
            {"cert": "c", "key": "k", "client_auth": "require"},
            "listen.tls.client_ca: required when client_auth is 'require'",
        ),
        (
            {"cert": "c", "key": "k", "client_auth": "optional"},
            "listen.tls.client_auth: must be one of",
        ),
        (
            {"cert": "c", "key": "k", "client_ca": "ca.pem"},
            'listen.tls.client_ca: set, but client_auth is "none"',
        ),
        (
            {"cert": "c", "key": "k", "handshake_timeout": 10},
            "listen.tls.handshake_timeout: expected a duration",
        ),
        (
            {"cert": "c", "key": "k", "max_handshakes": -1},
            "listen.tls.max_handshakes: must be between 0",
        ),
        (
            {"cert": "c", "key": "k", "identity": "serial"},
            "listen.tls.identity: must be one of 'cn', 'dns', 'uri', 'email'",
        ),
        (
            {"cert": "c", "key": "k", "identity_header": "X Bad"},
            "listen.tls.identity_header: not a valid header name",
        ),
        ({"cert": "c", "key": "k", "certificate": "x"}, "listen.tls.certificate: unknown key"),
        (
            {"cert": "c", "key": "k", "sni": {"names": ["a"]}},
            "listen.tls.sni: expected an array of tables",
        ),
        (
            {"cert": "c", "key": "k", "sni": [{"cert": "c", "key": "k"}]},
            "listen.tls.sni[0].names: expected a non-empty list",
        ),
        (
            {"cert": "c", "key": "k", "sni": [{"names": ["a.b"], "key": "k"}]},
            "listen.tls.sni[0].cert: required",
        ),
        (
            {"cert": "c", "key": "k", "sni": [{"names": ["a..b"], "cert": "c", "key": "k"}]},
            "listen.tls.sni[0].names[0]: not a DNS name",
        ),
        (
            {"cert": "c", "key": "k", "sni": [{"names": ["a.*.b"], "cert": "c", "key": "k"}]},
            "listen.tls.sni[0].names[0]: not a DNS name",
        ),
        (
            {
                "cert": "c",
                "key": "k",
                "sni": [
                    {"names": ["a.b"], "cert": "c", "key": "k"},
                    {"names": ["A.B."], "cert": "c", "key": "k"},
                ],
            },
            "listen.tls.sni[1].names[0]: 'a.b' already listed in listen.tls.sni[0]",
        ),
        (
            {
                "cert": "c",
                "key": "k",
                "sni": [{"names": ["a.b"], "cert": "c", "key": "k", "alpn": []}],
            },
            "listen.tls.sni[0].alpn: unknown key",
        ),
        ("on", "listen.tls: expected a table"),
    ],
)
def test_listen_errors_name_the_key_path(raw, error):
    s, errors = parse(raw)
    assert s is None
    assert any(e.startswith(error) for e in errors), errors


def test_every_error_is_reported_at_once():
    _, errors = parse({"min_version": "1.0", "alpn": ["x"], "sni": [{"names": []}]})
    paths = {e.split(":")[0] for e in errors}
    assert {
        "listen.tls.cert",
        "listen.tls.key",
        "listen.tls.min_version",
        "listen.tls.alpn",
        "listen.tls.sni[0].names",
        "listen.tls.sni[0].cert",
        "listen.tls.sni[0].key",
    } <= paths


def test_sni_entries_are_normalised():
    s, errors = parse(
        {
            "cert": "c",
            "key": "k",
            "min_version": "1.3",
            "client_auth": "request",
            "client_ca": "ca.pem",
            "handshake_timeout": "3s",
            "max_handshakes": 0,
            "sni": [
                {
                    "names": ["API.Example.com.", "*.example.com"],
                    "cert": "api.crt",
                    "key": "/abs/api.key",
                }
            ],
        }
    )
    assert errors == []
    assert s.sni == (
        tls.SniCert(("api.example.com", "*.example.com"), "/etc/sp/api.crt", "/abs/api.key"),
    )
    assert (s.min_version, s.client_ca, s.handshake_timeout, s.max_handshakes) == (
        "1.3",
        "/etc/sp/ca.pem",
        3.0,
        0,
    )
    assert s.files() == (
        "/etc/sp/c",
        "/etc/sp/k",
        "/etc/sp/api.crt",
        "/abs/api.key",
        "/etc/sp/ca.pem",
    )


@pytest.mark.parametrize(
    "raw, error",
    [
        ({"cert": "c"}, "b.tls.key: cert and key go together"),
        ({"key": "k"}, "b.tls.cert: cert and key go together"),
        ({"server_name": "*.x.com"}, "b.tls.server_name: a wildcard cannot be sent"),
        ({"server_name": "bad name"}, "b.tls.server_name: not a DNS name"),
        ({"verify": False, "ca_file": "ca"}, "b.tls.ca_file: set, but verify is false"),
        ({"verify": "yes"}, "b.tls.verify: expected true or false"),
        ({"sni": "x"}, "b.tls.sni: unknown key"),
        ({"min_version": "1.0"}, "b.tls.min_version: must be one of"),
    ],
)
def test_backend_errors_name_the_key_path(raw, error):
    errors: list[str] = []
    tls.parse_backend_tls(raw, errors, "b.tls", "/etc/sp")
    assert any(e.startswith(error) for e in errors), errors


def test_backend_defaults_verify_against_the_system_store():
    errors: list[str] = []
    assert tls.parse_backend_tls(None, errors, "b.tls") == tls.BackendTLS()
    b = tls.parse_backend_tls(
        {"ca_file": "ca.pem", "server_name": "Api.Internal", "cert": "c", "key": "k"},
        errors,
        "b.tls",
        "/etc/sp",
    )
    assert errors == []
    assert b == tls.BackendTLS(
        ca_file="/etc/sp/ca.pem", server_name="api.internal", cert="/etc/sp/c", key="/etc/sp/k"
    )
    assert tls.BackendTLS().verify is True
    assert tls.server_hostname(tls.BackendTLS(), "10.0.0.5") == "10.0.0.5"
    assert tls.server_hostname(tls.BackendTLS(), "[::1]") == "::1"
    assert tls.server_hostname(b, "10.0.0.5") == "api.internal"


EXACT = {"a.example.com": "A", "example.com": "APEX"}
WILD = {"example.com": "WILD", "wild.test": "W2"}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.example.com", "A"),  # exact wins over the wildcard
        ("A.Example.COM.", "A"),  # case and a trailing dot do not matter
        ("b.example.com", "WILD"),  # *.example.com: one label
        ("x.y.example.com", "DEFAULT"),  # a wildcard matches exactly one label (RFC 6125 §6.4.3)
        ("example.com", "APEX"),  # ... and not the apex
        ("q.wild.test", "W2"),
        ("wild.test", "DEFAULT"),
        ("other.org", "DEFAULT"),
        ("", "DEFAULT"),
        (None, "DEFAULT"),  # no SNI extension
    ],
)
def test_select_context(name, expected):
    assert tls.select_context(name, EXACT, WILD, "DEFAULT") == expected


CERT = {
    "subject": (
        (("countryName", "DE"),),
        (("organizationName", "Shop"),),
        (("commonName", "svc-orders"),),
    ),
    "subjectAltName": (
        ("DNS", "orders.internal"),
        ("DNS", "orders2.internal"),
        ("URI", "spiffe://shop/orders"),
        ("email", "orders@shop.example"),
    ),
}


@pytest.mark.parametrize(
    "cert, kind, expected",
    [
        (CERT, "cn", "svc-orders"),
        (CERT, "dns", "orders.internal"),  # the first SAN of the type
        (CERT, "uri", "spiffe://shop/orders"),
        (CERT, "email", "orders@shop.example"),
        ({"subject": CERT["subject"]}, "dns", None),  # no SAN of that type
        ({"subject": ((("commonName", "outer"),), (("commonName", "inner"),))}, "cn", "inner"),
        ({"subjectAltName": (("DNS", "x"),)}, "cn", None),
        ({}, "cn", None),  # unverified: getpeercert() is {}
        (None, "cn", None),
        (
            {"subject": ((("commonName", "evil\r\nX-Sticky-Key: 1"),),)},
            "cn",
            None,
        ),  # no header injection
        ({"subject": ((("commonName", "Jürgen"),),)}, "cn", None),  # not forwarded altered
        ({"subject": ((("commonName", " padded"),),)}, "cn", None),
        ({"subject": ((("commonName", "x" * (tls.MAX_IDENTITY + 1)),),)}, "cn", None),
        ({"subject": ((("commonName", "CN with spaces"),),)}, "cn", "CN with spaces"),
    ],
)
def test_identity_from_cert(cert, kind, expected):
    assert tls.identity_from_cert(cert, kind) == expected


def test_client_identity_without_tls_or_before_the_handshake():
    assert tls.client_identity(None) is None


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_gate_caps_and_releases():
    clock = Clock()
    gate = tls.HandshakeGate(2, timeout=5.0, clock=clock)
    a, b = gate._admit(), gate._admit()
    assert a is not None and b is not None and gate.in_progress == 2
    assert gate._admit() is None and gate.refused == 1
    gate._finish(a, True)
    gate._finish(a, True)  # idempotent
    assert gate.in_progress == 1 and gate.completed == 1
    c = gate._admit()
    assert c is not None and gate.in_progress == 2
    gate._finish(c, False)
    assert gate.completed == 1 and gate.in_progress == 1


def test_gate_forgets_a_handshake_older_than_its_timeout():
    # The loop has aborted it by then, whether or not its SSL object was freed.
    clock = Clock()
    gate = tls.HandshakeGate(1, timeout=5.0, clock=clock)
    assert gate._admit() is not None
    assert gate._admit() is None
    clock.t += 5.0 + 1.0 + 0.01
    assert gate.in_progress == 0
    assert gate._admit() is not None


def test_gate_without_a_cap():
    gate = tls.HandshakeGate(0, timeout=5.0)
    assert all(gate._admit() is not None for _ in range(5000))
    assert gate.in_progress == 5000 and gate.refused == 0


def test_needs_new_listener():
    s = tls.ListenTLS(cert="c", key="k")
    assert tls.needs_new_listener(None, s) and tls.needs_new_listener(s, None)
    assert not tls.needs_new_listener(None, None)
    assert not tls.needs_new_listener(s, tls.ListenTLS(cert="c2", key="k2", min_version="1.3"))
    assert tls.needs_new_listener(s, tls.ListenTLS(cert="c", key="k", handshake_timeout=3.0))


def test_file_watch_sees_rewrite_and_rename(tmp_path):
    p = tmp_path / "c.pem"
    p.write_bytes(b"one")
    w = tls.FileWatch((str(p), str(p)))
    assert not w.changed()
    p.write_bytes(b"three")  # size
    assert w.changed()
    w.mark()
    new = tmp_path / "new.pem"
    new.write_bytes(b"three")
    os.replace(new, p)  # how certbot and secret mounts swap files: inode
    assert w.changed()
    w.mark()
    p.unlink()
    assert w.changed()  # gone counts as changed (the reload reports it)


def test_describe_non_tls_failures():
    assert (
        tls.describe_verify_error(ConnectionResetError())
        == "TLS: connection closed during the handshake"
    )
    assert tls.describe_verify_error(TimeoutError()) == "TLS: handshake timed out"


def test_server_context_refuses_missing_files_with_the_key_path(tmp_path):
    s = tls.ListenTLS(cert=str(tmp_path / "nope.crt"), key=str(tmp_path / "nope.key"))
    with pytest.raises(ConfigError) as e:
        tls.server_context(s)
    assert e.value.errors[0].startswith("listen.tls.cert: cannot read")
    assert "No such file" in e.value.errors[0]
