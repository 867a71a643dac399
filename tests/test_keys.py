"""Key extraction, table-tested: sources in order, repeats, limits, encodings."""

import re

import pytest

from stickyproxy.config import KeySource
from stickyproxy.routing.keys import KeyExtractor, KeyRejected

HDR = KeySource("header", "X-User-Id")
COOKIE = KeySource("cookie", "uid")
QUERY = KeySource("query", "user")
PATH = KeySource("path", pattern=re.compile(r"^/users/(?P<key>[^/]+)"))
ALL = [HDR, COOKIE, QUERY, PATH]


def extract(headers=(), path=b"/", query=b"", sources=ALL, max_length=256):
    got = KeyExtractor(sources, max_length).extract(list(headers), path, query)
    return None if got is None else (got.key, got.source.kind)


@pytest.mark.parametrize(
    "headers, path, query, expected",
    [
        ([(b"x-user-id", b"alice")], b"/", b"", ("alice", "header")),
        ([(b"x-user-id", b"  alice ")], b"/", b"", ("alice", "header")),
        ([(b"cookie", b"a=1; uid=bob; z=2")], b"/", b"", ("bob", "cookie")),
        ([(b"cookie", b'uid="quoted"')], b"/", b"", ("quoted", "cookie")),
        ([], b"/x", b"a=1&user=carol", ("carol", "query")),
        ([], b"/x", b"user=c%C3%A9line", ("céline", "query")),
        ([], b"/x", b"user=a+b", ("a b", "query")),
        ([], b"/users/dave/cart", b"", ("dave", "path")),
        ([], b"/users/d%20ave/cart", b"", ("d ave", "path")),
        # order: the header wins over every later source
        ([(b"x-user-id", b"h"), (b"cookie", b"uid=c")], b"/users/p", b"user=q", ("h", "header")),
        ([(b"cookie", b"uid=c")], b"/users/p", b"user=q", ("c", "cookie")),
        # empty values fall through to the next source
        ([(b"x-user-id", b""), (b"cookie", b"uid=")], b"/users/p", b"user=", ("p", "path")),
        # nothing
        ([(b"x-other", b"v")], b"/", b"", None),
        ([], b"/users/", b"", None),
        # identical repeats are fine; the first cookie wins
        ([(b"x-user-id", b"a"), (b"x-user-id", b"a")], b"/", b"", ("a", "header")),
        ([(b"cookie", b"uid=first; uid=second")], b"/", b"", ("first", "cookie")),
        ([(b"cookie", b"uid=first"), (b"cookie", b"uid=second")], b"/", b"", ("first", "cookie")),
        ([], b"/", b"user=a&user=a", ("a", "query")),
        # a cookie name is matched exactly
        ([(b"cookie", b"xuid=no; uidx=no")], b"/", b"", None),
    ],
)
def test_extraction_table(headers, path, query, expected):
    assert extract(headers, path, query) == expected


@pytest.mark.parametrize(
    "headers, path, query, reason",
    [
        ([(b"x-user-id", b"a"), (b"x-user-id", b"b")], b"/", b"", "repeated with different values"),
        ([], b"/", b"user=a&user=b", "repeated with different values"),
        ([(b"x-user-id", b"x" * 257)], b"/", b"", "longer than 256"),
        ([(b"x-user-id", b"\xff\xfe")], b"/", b"", "not valid UTF-8"),
        ([(b"x-user-id", b"a\x01b")], b"/", b"", "control characters"),
        ([], b"/", b"user=a%00b", "control characters"),
        ([], b"/", b"user=%C2%85", "control characters"),
        ([], b"/users/%ff", b"", "not valid UTF-8"),
    ],
)
def test_rejected_keys(headers, path, query, reason):
    with pytest.raises(KeyRejected, match=reason):
        extract(headers, path, query)


def test_max_length_is_configurable_and_counts_bytes():
    assert extract([(b"x-user-id", "é".encode() * 5)], max_length=10) == ("ééééé", "header")
    with pytest.raises(KeyRejected):
        extract([(b"x-user-id", "é".encode() * 6)], max_length=10)


def test_only_configured_sources_are_consulted():
    assert extract([(b"cookie", b"uid=c")], sources=[HDR]) is None
    assert extract([], b"/users/p", sources=[QUERY]) is None
