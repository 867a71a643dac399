"""User-key extraction from a request head: pure, no I/O.

Sources are tried in the configured order; the first that yields a non-empty key wins.
Decisions where the RFCs leave room (each table-tested):

- A header or query parameter present several times with *different* values is ambiguous:
  the request is refused rather than guessing which copy the client meant (a proxy and a
  backend that guess differently is how identity gets spoofed). Identical repeats are fine.
- A cookie present several times: the first wins. Browsers send the cookie with the most
  specific path first (RFC 6265 §5.4 step 2), and that is the one applications read.
- Query values and path captures are percent-decoded; header and cookie values are taken
  as sent (cookie values may be DQUOTE-wrapped, RFC 6265 §4.1.1: the quotes are removed).
- A key must be valid UTF-8 without control characters, and at most ``max_length`` bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from ..config import DEFAULT_MAX_KEY_LENGTH, KeySource
from .jwtkeys import InvalidToken, bearer_token

# C0 controls and DEL (RFC 9110 §5.5 forbids them in field values), plus C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class KeyRejected(ValueError):
    """The request carries a key that must not be routed on; the reason is client-safe.

    ``status`` is 400 for a malformed or ambiguous key, 401 for an invalid token.
    """

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


class Extracted:
    """A request's user key and the source that gave it (a plain class so that, compiled,
    building one per request never calls into the interpreter)."""

    __slots__ = ("key", "source")

    def __init__(self, key: str, source: KeySource):
        self.key = key
        self.source = source

    def __repr__(self) -> str:
        return f"Extracted({self.key!r}, {self.source!r})"


def _what(src: KeySource) -> str:
    return {
        "header": f"header {src.name}",
        "cookie": f"cookie {src.name}",
        "query": f"query parameter {src.name}",
        "jwt": f"token claim in {src.name}",
    }.get(src.kind, "path")


def _check(raw: bytes, max_length: int, src: KeySource) -> str:
    if len(raw) > max_length:
        what = _what(src)
        raise KeyRejected(f"{what}: user key longer than {max_length} bytes")
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyRejected(f"{_what(src)}: user key is not valid UTF-8") from None
    # printable ASCII (the usual case) needs no further check
    if not (key.isascii() and key.isprintable()) and _CONTROL.search(key):
        raise KeyRejected(f"{_what(src)}: user key contains control characters")
    return key


def _cookie(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for value in [v for n, v in headers if n == b"cookie"]:
        for pair in value.split(b";"):
            k, sep, v = pair.strip().partition(b"=")
            if sep and k.strip() == name:
                v = v.strip()
                if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
                    v = v[1:-1]
                return v
    return None


def _query_values(query: bytes, name: bytes) -> list[bytes]:
    out = []
    for pair in query.split(b"&"):
        k, _, v = pair.partition(b"=")
        if unquote_to_bytes(k.replace(b"+", b" ")) == name:
            out.append(unquote_to_bytes(v.replace(b"+", b" ")))
    return out


def _one(values: list[bytes], what: str) -> bytes | None:
    values = [v for v in values if v]
    if not values:
        return None
    first = values[0]
    if any(v != first for v in values[1:]):
        raise KeyRejected(f"{what}: repeated with different values")
    return first


class KeyExtractor:
    """Applies an ordered list of key sources to a request head."""

    __slots__ = ("sources", "max_length", "_plan")

    def __init__(self, sources: Sequence[KeySource], max_length: int = DEFAULT_MAX_KEY_LENGTH):
        self.sources = tuple(sources)
        self.max_length = max_length
        self._plan = [
            (
                s,
                s.name.lower().encode("latin-1")
                if s.kind in ("header", "jwt")
                else s.name.encode("utf-8"),
            )
            for s in self.sources
        ]

    def extract(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        path: bytes,
        query: bytes = b"",
        identity: str | None = None,
    ) -> Extracted | None:
        """The request's user key, or None if no source yields one.

        ``headers`` are (lower-cased name, value) pairs as received; ``path`` is the
        request target's path and ``query`` its query string (without '?'); ``identity``
        the connection's verified client certificate identity (tls.client_identity).
        Raises KeyRejected for an ambiguous, oversized or malformed key.
        """
        for src, name in self._plan:
            kind = src.kind
            if kind == "header":
                raw = None
                for n, v in headers:
                    if n == name:
                        v = v.strip(b" \t")
                        if not v:
                            continue
                        if raw is None:
                            raw = v
                        elif v != raw:
                            raise KeyRejected(f"header {src.name}: repeated with different values")
                if raw is None:
                    continue
            elif kind == "cookie":
                raw = _cookie(headers, name) or None
            elif kind == "query":
                raw = _one(_query_values(query, name), _what(src)) if query else None
            elif kind == "jwt":
                key = self._jwt(src, headers, name)
                if key is not None:
                    return Extracted(key, src)
                continue
            elif kind == "path":
                m = src.pattern.search(path.decode("latin-1")) if src.pattern else None
                raw = unquote_to_bytes(m.group("key")) if m and m.group("key") else None
            elif kind == "client-cert":
                raw = identity.encode("utf-8") if identity else None
            else:
                continue
            if raw:
                return Extracted(_check(raw, self.max_length, src), src)
        return None

    def _jwt(
        self, src: KeySource, headers: Sequence[tuple[bytes, bytes]], name: bytes
    ) -> str | None:
        """The verified claim, None when there is no token (or an invalid one is allowed to
        fall through), KeyRejected(401) for an invalid token."""
        values = [v for n, v in headers if n == name]
        if not values:
            return None
        verifier = src.jwt
        if len(values) > 1:
            if verifier.settings.on_invalid == "anonymous":
                return None
            raise KeyRejected(f"more than one {src.name} header", 401)
        token = (
            bearer_token(values[0])
            if name == b"authorization"
            else values[0].strip().decode("ascii", "replace")
        )
        if not token:
            return None
        try:
            key = verifier.verify(token)
        except InvalidToken as e:
            if verifier.settings.on_invalid == "anonymous":
                return None
            raise KeyRejected(f"invalid token: {e}", 401) from None
        return _check(key.encode("utf-8"), self.max_length, src)
