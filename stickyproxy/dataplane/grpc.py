"""gRPC over the proxy: which requests are gRPC calls, and the status a gRPC client gets
for an error the proxy makes itself (a text/plain 502 would reach a gRPC client as an
HTTP status it can only guess from). Pure; dataplane/h2client.py applies it.

References: gRPC over HTTP/2 (PROTOCOL-HTTP2.md: Content-Type, Status, Status-Message),
and the HTTP-to-gRPC status mapping (http-grpc-status-mapping.md), narrowed where the
proxy knows better (its own timeout is DEADLINE_EXCEEDED, not UNAVAILABLE).
"""

from __future__ import annotations

from typing import Final

# PROTOCOL-HTTP2.md: "application/grpc" optionally followed by "+proto", "+json", ...
CONTENT_TYPE: Final = b"application/grpc"

# google.rpc.Code values used here.
OK: Final = 0
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16

# The status of a proxy-made error, by the HTTP status the proxy would have answered.
# 502/503: no backend could take the call, retrying later may work (UNAVAILABLE); 504 and
# 408: a time limit of the proxy's ran out (DEADLINE_EXCEEDED).
_BY_HTTP_STATUS: Final = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    405: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}

# A call whose response was cut short after it began (its backend failed mid-call).
CUT_SHORT: Final = UNAVAILABLE


def is_grpc(content_type: bytes | None) -> bool:
    """A request with this Content-Type is a gRPC call."""
    if content_type is None:
        return False
    ct = content_type.lower()
    return (
        ct == CONTENT_TYPE
        or ct.startswith(CONTENT_TYPE + b"+")
        or ct.startswith(CONTENT_TYPE + b";")
    )


def status_for(http_status: int) -> int:
    """The gRPC status code for a proxy-made error of ``http_status``."""
    return _BY_HTTP_STATUS.get(http_status, UNKNOWN)


def encode_message(message: str) -> bytes:
    """``grpc-message``'s value: UTF-8, percent-encoded outside printable ASCII and for
    "%" itself (PROTOCOL-HTTP2.md, Status-Message)."""
    out = bytearray()
    for b in message.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def error_fields(http_status: int, message: str) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC response (HTTP/2 HEADERS with END_STREAM) for a proxy-made
    error that would have been ``http_status`` with ``message``."""
    return [
        (b":status", b"200"),
        (b"content-type", CONTENT_TYPE),
        (b"grpc-status", b"%d" % status_for(http_status)),
        (b"grpc-message", encode_message(message)),
    ]


def cut_short_trailers(message: str) -> list[tuple[bytes, bytes]]:
    """The trailers that end a call whose response was cut short."""
    return [(b"grpc-status", b"%d" % CUT_SHORT), (b"grpc-message", encode_message(message))]
