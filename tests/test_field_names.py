"""How request and response fields are classified by name, and the bounded memory of it."""

import pytest

from stickyproxy.config import parse
from stickyproxy.control.process import build_process
from stickyproxy.dataplane import Proxy, upstream
from stickyproxy.dataplane.http import (
    FIELD_CACHE_SIZE,
    FIELD_FORWARD,
    FIELD_SPECIAL,
    FIELD_SPECIAL_FORWARD,
)

BASE = {
    "listen": {"port": 0},
    "admin": {"enabled": False},
    "health": {"enabled": False},
    "backends": [{"id": "a", "url": "http://127.0.0.1:1"}],
}


def proxy(**headers) -> Proxy:
    return build_process(parse({**BASE, "headers": headers} if headers else BASE), "single").proxy


@pytest.mark.parametrize(
    "name, kind",
    [
        (b"Accept", FIELD_FORWARD),
        (b"X-User-Id", FIELD_FORWARD),
        (b"Host", FIELD_SPECIAL_FORWARD),
        (b"HOST", FIELD_SPECIAL_FORWARD),
        (b"Content-Length", FIELD_SPECIAL),
        (b"transfer-encoding", FIELD_SPECIAL),
        (b"Connection", FIELD_SPECIAL),
        (b"Keep-Alive", FIELD_SPECIAL),
        (b"Proxy-Authorization", FIELD_SPECIAL),
        (b"X-Forwarded-For", FIELD_SPECIAL),
        (b"Forwarded", FIELD_SPECIAL),
        (b"X-Sticky-Backend", FIELD_SPECIAL),  # the proxy's own prefix: never from a client
        (b"x-sticky-anything", FIELD_SPECIAL),
        (b"X_User_Id", FIELD_SPECIAL),  # underscores: dropped by default
        (b"X-Stickyish", FIELD_FORWARD),
    ],
)
def test_request_field_kinds(name, kind):
    p = proxy()
    assert p.request_field(name) == (name.lower(), kind, name + b": ")
    assert p.request_fields[name] == (name.lower(), kind, name + b": ")


def test_request_field_kinds_follow_the_configuration_and_its_reloads():
    p = proxy(allow_underscores=True, strip=["X-Internal"])
    assert p.request_field(b"X_User_Id")[1] == FIELD_FORWARD
    assert p.request_field(b"X-Internal")[1] == FIELD_SPECIAL
    p.table.apply(parse(BASE))  # a reload forgets what was classified
    p.apply()
    assert p.request_fields == {}
    assert p.request_field(b"X_User_Id")[1] == FIELD_SPECIAL
    assert p.request_field(b"X-Internal")[1] == FIELD_FORWARD


def test_request_field_memory_is_bounded():
    p = proxy()
    for i in range(FIELD_CACHE_SIZE * 2 + 3):
        p.request_field(b"X-Name-%d" % i)
        assert len(p.request_fields) <= FIELD_CACHE_SIZE


@pytest.mark.parametrize(
    "name, watched",
    [
        (b"Server", False),
        (b"Content-Type", False),
        (b"Tee", False),
        (b"Upgraded", False),
        (b"Content-Length", True),
        (b"CONNECTION", True),
        (b"kEEP-aLIVE", True),
        (b"TE", True),
        (b"Trailer", True),
        (b"Transfer-Encoding", True),
        (b"Upgrade", True),
        (b"Proxy-Authenticate", True),
        (b"HTTP2-Settings", True),
        (b"Proxy-Connection", True),
    ],
)
def test_response_field_kinds(name, watched):
    assert upstream.response_field(name) == (name.lower(), watched, name + b": ")


def test_response_field_memory_is_bounded():
    for i in range(FIELD_CACHE_SIZE * 2 + 3):
        upstream.response_field(b"X-Name-%d" % i)
        assert len(upstream._response_fields) <= FIELD_CACHE_SIZE
