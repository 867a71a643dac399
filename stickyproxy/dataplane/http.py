"""HTTP/1.1 message rules the data plane applies: pure, no I/O.

Framing and parsing are llhttp's (strict mode, no lenient flags); this module holds what a
proxy adds on top: which fields are hop-by-hop, how a request target is normalised, which
methods may be retried, and the short error responses the proxy itself sends.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from .. import contract

# RFC 9110 §9.2.2 (declared in contract.py, shared with the context library): only these
# are retried after a request may have reached a backend.
IDEMPOTENT_METHODS: Final = contract.IDEMPOTENT_METHODS

# RFC 9110 §7.6.1 connection-specific fields, plus the de-facto ones proxies must drop
# (Proxy-Connection, Keep-Alive) and HTTP/2 cleartext upgrade settings (never forwarded).
# Transfer-Encoding is re-framed by the proxy on each hop (RFC 9112 §6.1).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"http2-settings",
    }
)

# Fields the proxy sets itself on each forwarded request; client copies are dropped unless
# the peer is a trusted proxy (X-Forwarded-*).
FORWARDED: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)

# How a field is handled, by name (see Proxy.request_field and upstream.response_field).
FIELD_FORWARD: Final = 0  # forwarded as received
FIELD_SPECIAL: Final = 1  # looked at by the proxy, not forwarded as received
FIELD_SPECIAL_FORWARD: Final = 2  # looked at by the proxy and forwarded (Host)

# Field names are classified once per spelling and remembered, since a keep-alive
# connection repeats the same names on every request; the memory is bounded because the
# names are peer input (when full it is emptied and refills from live traffic).
FIELD_CACHE_SIZE: Final = 4096

# Statuses whose responses never carry a body (RFC 9110 §6.4.1, §15.3.5, §15.4.5).
NO_BODY_STATUSES: Final = frozenset({204, 304})

# What llhttp reports when a connection starts with the HTTP/2 preface's request line
# (RFC 9113 §3.4, "PRI * HTTP/2.0"): client.py hands such a connection to h2client.py.
PREFACE_PAUSE: Final = "Pause on PRI/Upgrade"

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class RequestError(Exception):
    """A request the proxy answers itself; ``reason`` is short and safe to show a client."""

    def __init__(self, status: int, reason: str, extra: bytes = b""):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.extra = extra  # header lines to add to the error response


def error_response(
    status: int, reason: str, *, close: bool, head_only: bool = False, extra: bytes = b""
) -> bytes:
    """A complete short plain-text response: "<status> <phrase>: <reason>\\n"."""
    phrase = REASONS.get(status, "Error")
    body = f"{status} {phrase}: {reason}\n".encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n"
    ).encode()
    if close:
        head += b"Connection: close\r\n"
    return head + extra + b"\r\n" + (b"" if head_only else body)


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Lower-cased option names listed by Connection header fields (RFC 9110 §7.6.1)."""
    out: set[bytes] = set()
    for v in values:
        for tok in v.split(b","):
            tok = tok.strip().lower()
            if tok:
                out.add(tok)
    return out


def normalise_target(method: str, target: bytes, host: bytes | None) -> bytes:
    """The origin-form target to forward (RFC 9112 §3.2), or RequestError.

    origin-form is kept; absolute-form is rewritten to origin-form when its authority is
    the request's Host (otherwise the two disagree about where the request goes: 400);
    asterisk-form is refused. CONNECT is refused whatever its target (see
    ``refuse_method``).
    """
    refuse_method(method)
    if target[:1] == b"/":
        return target
    if target == b"*":
        raise RequestError(400, "asterisk-form request target is not supported")
    low = target[:8].lower()
    if low.startswith(b"http://") or low.startswith(b"https://"):
        try:
            parts = urlsplit(target.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise RequestError(400, "malformed absolute-form request target") from None
        if not parts.netloc or parts.username is not None or parts.password is not None:
            raise RequestError(400, "malformed absolute-form request target")
        if host is None or _authority(parts.netloc, parts.scheme) != _authority(
            host.decode("latin-1"), parts.scheme
        ):
            raise RequestError(400, "absolute-form request target does not match Host")
        path = parts.path or "/"
        return (path + ("?" + parts.query if parts.query else "")).encode("ascii")
    raise RequestError(400, "malformed request target")


def refuse_method(method: str) -> None:
    """RequestError for a method a reverse proxy in front of app instances never forwards.

    CONNECT asks the proxy to open a tunnel (RFC 9110 §9.3.6): its request has no defined
    body semantics and a 2xx answer turns the connection into a tunnel (RFC 9112 §6.3), so
    forwarding it, in any target form, would put bytes on a pooled upstream connection
    that no reader can frame. Every other method is forwarded: methods are extensible
    (RFC 9110 §9.1, §16.1).
    """
    if method == "CONNECT":
        # no Allow field: which methods the app behind supports is the app's to say
        raise RequestError(405, "CONNECT is not supported")


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def _authority(value: str, scheme: str) -> str:
    """An authority compared case-insensitively, without its scheme's default port; an
    empty port is the default one (RFC 3986 §3.2.3, §6.2.3)."""
    value = value.lower()
    if value.endswith(":"):
        return value[:-1]
    default = _DEFAULT_PORTS.get(scheme.lower())
    if default and value.endswith(default):
        value = value[: -len(default)]
    return value


# RFC 9112 §3: request-line = method SP request-target SP HTTP-version CRLF, and
# HTTP-version "HTTP/" DIGIT "." DIGIT (RFC 9112 §2.3). A method is a token (RFC 9110
# §9.1); of the tokens, extension methods are taken in upper case, digits, "-", "_" and "."
# only (as NGINX does): methods are case-sensitive, and a backend that folds "get" into GET
# would run what the proxy judged an unknown, never-retried method. The target is checked
# by llhttp once the line is fed to it again.
_REQUEST_LINE: Final = re.compile(rb"([A-Z0-9_.\-]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")

# The method llhttp is shown in place of an extension method it does not know: one with no
# special meaning to llhttp's request framing (unlike CONNECT), and rare, so that only a
# request parsed as this method costs the look-up of the method it stands in for.
STAND_IN_METHOD: Final = b"UNLINK"


def rewrite_request_line(line: bytes, unknown_method: bool) -> tuple[bytes, str] | None:
    """The request line llhttp can parse in place of ``line`` (which ends in CRLF), and the
    method to forward; None when the line is not one RFC 9112 §3 allows.

    llhttp knows a fixed list of methods and versions. Two things it refuses are valid:
    an extension method (RFC 9110 §9.1: methods are extensible; shown to llhttp as
    ``STAND_IN_METHOD`` and forwarded as sent) and a later HTTP/1 minor version (RFC 9110
    §2.5: processed as the highest minor version this recipient conforms to, 1.1).
    """
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        return None
    method, target, major, minor = m.groups()
    if major != b"1" or method == b"CONNECT":
        return None
    if not unknown_method and minor in (b"0", b"1"):
        return None  # llhttp refused something else in this line
    shown = STAND_IN_METHOD if unknown_method else method
    version = b"1.0" if minor == b"0" else b"1.1"
    return shown + b" " + target + b" HTTP/" + version + b"\r\n", method.decode("ascii")


def is_chunked_only(values: list[bytes]) -> bool:
    """True when Transfer-Encoding is exactly one "chunked" coding (RFC 9112 §6.1).

    Any other coding or a repeated one is refused: the proxy cannot know how a backend
    would frame it, and disagreement about framing is request smuggling.
    """
    # spaces only: llhttp accepts trailing spaces but refuses a tab after "chunked"
    return len(values) == 1 and values[0].strip(b" ").lower() == b"chunked"


# Connection values that name no field to remove, and fields that are end-to-end by
# definition: a Connection field naming them is ignored for them (removing Host would
# forward a request without one).
_NEVER_HOP_BY_HOP: Final = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"host", b"content-length"}
)


def without_named(lines: list[bytes], tokens: set[bytes]) -> list[bytes]:
    """Drop the header lines whose names a Connection field lists (RFC 9110 §7.6.1)."""
    tokens = tokens - _NEVER_HOP_BY_HOP
    if not tokens:
        return lines
    return [ln for ln in lines if ln.split(b":", 1)[0].strip().lower() not in tokens]
