"""build_request (dataplane/request.py): a request head in, the forwarded head or a local
error out; no sockets."""

import pytest

from stickyproxy.config import parse
from stickyproxy.control.process import build_process
from stickyproxy.dataplane.http import FIELD_FORWARD, FIELD_SPECIAL, RequestError
from stickyproxy.dataplane.request import build_request


def proxy(**sections):
    raw = {
        "listen": {"port": 8080, "trusted_proxies": ["10.0.0.0/8"]},
        "admin": {"enabled": False},
        "health": {"enabled": False},
        "backends": [{"id": "a", "url": "http://127.0.0.1:1"}],
        **sections,
    }
    return build_process(parse(raw), "single").proxy


def build(
    p,
    fields,
    *,
    method="GET",
    target=b"/p?q=1",
    version="1.1",
    keep_alive=True,
    peer="192.0.2.7",
    upgrade=False,
    known_host=None,
):
    """What ClientProtocol.on_header collects, then build_request."""
    headers, special, fwd = [], [], []
    for name, value in fields:
        ln, kind, lead = p.request_field(name)
        headers.append((ln, value))
        if kind != FIELD_FORWARD:
            special.append((ln, value))
            if kind == FIELD_SPECIAL:
                continue
        fwd.append(lead + value + b"\r\n")
    return build_request(
        p,
        method,
        version,
        keep_alive,
        target,
        headers,
        special,
        fwd,
        upgrade,
        peer,
        peer.encode(),
        p.is_trusted(peer),
        known_host,
    )


def head_lines(req):
    return req.head.decode().split("\r\n")


def test_a_plain_request_is_forwarded_with_the_proxy_fields():
    p = proxy()
    req = build(p, [(b"Host", b"shop"), (b"X-User-Id", b"u1"), (b"Accept", b"*/*")])
    lines = head_lines(req)
    assert lines[0] == "GET /p?q=1 HTTP/1.1"
    assert "Host: shop" in lines and "Accept: */*" in lines
    assert "X-Forwarded-For: 192.0.2.7" in lines and "X-Forwarded-Proto: http" in lines
    assert "X-Sticky-Key: u1" in lines and any(x.startswith("X-Sticky-Ring: ") for x in lines)
    assert (req.key, req.framing, req.length, req.close_after) == ("u1", "none", 0, False)


@pytest.mark.parametrize(
    "fields, version, method, upgrade, status, reason",
    [
        ([], "1.1", "GET", False, 400, "missing Host header"),
        ([(b"Host", b"a"), (b"Host", b"b")], "1.1", "GET", False, 400, "more than one Host"),
        ([(b"Host", b"a b")], "1.1", "GET", False, 400, "invalid Host header"),
        (
            [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip")],
            "1.1",
            "POST",
            False,
            400,
            "unsupported transfer coding",
        ),
        (
            [(b"Transfer-Encoding", b"chunked")],
            "1.0",
            "POST",
            False,
            400,
            "Transfer-Encoding in an HTTP/1.0 request",
        ),
        ([(b"Host", b"a")], "2.0", "GET", False, 505, "HTTP/2.0 is not supported"),
        ([(b"Host", b"a")], "1.1", "CONNECT", True, 405, ""),
        (
            [
                (b"Host", b"a"),
                (b"Content-Length", b"3"),
                (b"Upgrade", b"websocket"),
                (b"Connection", b"upgrade"),
            ],
            "1.1",
            "GET",
            True,
            400,
            "cannot carry a body",
        ),
    ],
)
def test_bad_heads_are_refused_with_a_status_and_reason(
    fields, version, method, upgrade, status, reason
):
    with pytest.raises(RequestError) as e:
        build(
            proxy(),
            fields + [(b"X-User-Id", b"u")],
            version=version,
            method=method,
            upgrade=upgrade,
        )
    assert e.value.status == status and reason in e.value.reason


def test_a_body_larger_than_the_limit_is_refused_before_reading_it():
    p = proxy(limits={"max_body": "1KiB"})
    with pytest.raises(RequestError) as e:
        build(
            p, [(b"Host", b"a"), (b"X-User-Id", b"u"), (b"Content-Length", b"2048")], method="POST"
        )
    assert e.value.status == 413


def test_connection_named_fields_are_dropped_but_host_never_is():
    req = build(
        proxy(),
        [
            (b"Host", b"a"),
            (b"X-User-Id", b"u"),
            (b"X-Secret", b"s"),
            (b"Connection", b"x-secret, host"),
        ],
    )
    lines = head_lines(req)
    assert "Host: a" in lines and not any(x.startswith("X-Secret") for x in lines)


def test_client_fields_in_the_proxys_namespace_never_pass():
    req = build(proxy(), [(b"Host", b"a"), (b"X-User-Id", b"u"), (b"X-Sticky-Key", b"admin")])
    assert [x for x in head_lines(req) if x.startswith("X-Sticky-Key")] == ["X-Sticky-Key: u"]


def test_forwarded_for_is_kept_only_from_a_trusted_peer():
    fields = [
        (b"Host", b"a"),
        (b"X-User-Id", b"u"),
        (b"X-Forwarded-For", b"203.0.113.9"),
        (b"X-Forwarded-Proto", b"https"),
    ]
    trusted = head_lines(build(proxy(), fields, peer="10.1.2.3"))
    assert "X-Forwarded-For: 203.0.113.9, 10.1.2.3" in trusted
    assert "X-Forwarded-Proto: https" in trusted
    untrusted = head_lines(build(proxy(), fields, peer="192.0.2.7"))
    assert "X-Forwarded-For: 192.0.2.7" in untrusted and "X-Forwarded-Proto: http" in untrusted


@pytest.mark.parametrize(
    "no_key, peer, xff, route_key, status",
    [
        ("client-ip", "192.0.2.7", b"203.0.113.9", "192.0.2.7", None),  # untrusted: the peer
        ("client-ip", "10.1.2.3", b"203.0.113.9, 10.9.9.9", "203.0.113.9", None),
        ("round-robin", "10.1.2.3", b"203.0.113.9", None, None),
        ("reject", "10.1.2.3", b"203.0.113.9", None, 400),
    ],
)
def test_the_no_key_policy(no_key, peer, xff, route_key, status):
    p = proxy(routing={"no_key": no_key})
    fields = [(b"Host", b"a"), (b"X-Forwarded-For", xff)]
    if status:
        with pytest.raises(RequestError) as e:
            build(p, fields, peer=peer)
        assert e.value.status == status
        return
    req = build(p, fields, peer=peer)
    assert req.key is None and req.route_key == route_key


def test_pipelined_keyless_requests_each_keep_their_own_client_address():
    """Two requests from one trusted proxy connection, for two different clients: each is
    routed by its own X-Forwarded-For, whatever order they are routed in."""
    p = proxy(routing={"no_key": "client-ip"})
    first = build(p, [(b"Host", b"a"), (b"X-Forwarded-For", b"203.0.113.1")], peer="10.0.0.1")
    second = build(p, [(b"Host", b"a"), (b"X-Forwarded-For", b"203.0.113.2")], peer="10.0.0.1")
    assert (first.route_key, second.route_key) == ("203.0.113.1", "203.0.113.2")


def test_http10_without_host_gets_the_listen_address_and_closes():
    p = proxy()
    req = build(p, [(b"X-User-Id", b"u")], version="1.0", keep_alive=False)
    assert f"Host: {p.config.listen.host}:8080" in head_lines(req)
    assert req.close_after and req.host is None


def test_a_websocket_upgrade_is_forwarded_as_one():
    req = build(
        proxy(),
        [
            (b"Host", b"a"),
            (b"X-User-Id", b"u"),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
        ],
        upgrade=True,
    )
    assert req.upgrade and "Upgrade: websocket" in head_lines(req)


def test_an_invalid_jwt_is_a_401_with_a_challenge(monkeypatch):
    monkeypatch.setenv("SP_REQ_TEST", "k" * 32)
    from stickyproxy.config import resolve

    raw = {
        "listen": {"port": 8080},
        "admin": {"enabled": False},
        "health": {"enabled": False},
        "routing": {
            "keys": [{"from": "jwt", "algorithms": ["HS256"], "secret_env": "SP_REQ_TEST"}]
        },
        "backends": [{"id": "a", "url": "http://127.0.0.1:1"}],
    }
    p = build_process(resolve(parse(raw)), "single").proxy
    with pytest.raises(RequestError) as e:
        build(p, [(b"Host", b"a"), (b"Authorization", b"Bearer not.a.token")])
    assert e.value.status == 401 and b"WWW-Authenticate: Bearer" in e.value.extra
