"""One request head, checked and rewritten for the backend: a pure function of what the
parser collected, the connection's facts and the proxy's settings; no I/O.

``build_request`` decides everything about a request before it is queued: its framing
(RFC 9112 §6), its Host (RFC 9110 §7.2), its user key (routing/keys.py) or what the no-key
policy does without one, whose X-Forwarded-For is trusted, and the exact head forwarded. It
returns a ``Request`` or raises ``RequestError`` (status, short reason) for the proxy to
answer. Every per-request value travels in the ``Request`` (then on its ``Exchange``), never
on the connection: requests pipelined on one connection may come from different clients
of a trusted proxy.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from ..routing.keys import KeyRejected
from .http import (
    RequestError,
    connection_tokens,
    is_chunked_only,
    normalise_target,
    refuse_method,
    without_named,
)

if TYPE_CHECKING:
    from .proxy import Proxy

# RFC 9110 §7.2 / RFC 3986 §3.2.2: a Host is a reg-name or IP literal with an optional port.
HOST_RE: Final = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]+)(?::\d{0,5})?$")


class Request:
    """A request ready to queue. ``host``: its Host value as checked (None: none sent)."""

    __slots__ = (
        "method",
        "target",
        "version",
        "head",
        "framing",
        "length",
        "upgrade",
        "key",
        "route_key",
        "close_after",
        "host",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        version: str,
        head: bytes,
        framing: str,
        length: int,
        upgrade: bool,
        key: str | None,
        route_key: str | None,
        close_after: bool,
        host: bytes | None,
    ):
        self.method = method
        self.target = target
        self.version = version
        self.head = head  # request line + forwarded fields, no framing
        self.framing = framing  # "none" | "cl" | "chunked"
        self.length = length
        self.upgrade = upgrade  # a WebSocket upgrade to forward
        self.key = key
        self.route_key = route_key  # the ring key of a keyless request under client-ip
        self.close_after = close_after
        self.host = host


def build_request(
    server: Proxy,
    method: str,
    version: str,
    keep_alive: bool,
    url: bytes,
    headers: list[tuple[bytes, bytes]],
    special: list[tuple[bytes, bytes]],
    fwd: list[bytes],
    upgrade_asked: bool,
    peer_ip: str | None,
    peer_bytes: bytes,
    trusted: bool,
    known_host: bytes | None,
    scheme: bytes = b"http",
    identity: str | None = None,
) -> Request:
    """``headers``: every field as (lower-cased name, value); ``special``: those the proxy
    handles itself (``Proxy.request_field``); ``fwd``: the field lines forwarded as they
    came; ``upgrade_asked``: llhttp saw an upgrade (or CONNECT); ``trusted``: the peer is
    one of ``listen.trusted_proxies``; ``known_host``: a Host value already checked on this
    connection (they nearly always repeat); ``scheme``: how the client reached the proxy
    (``https`` over [listen.tls]); ``identity``: its verified client certificate's."""
    host: bytes | None = None
    hosts = 0
    te: list[bytes] | None = None
    cl: bytes | None = None
    conn_values: list[bytes] | None = None
    upgrade_values: list[bytes] | None = None
    xff: list[bytes] = []
    xfp: bytes | None = None
    xfh: bytes | None = None
    for ln, v in special:
        if ln == b"host":
            hosts += 1
            host = v
        elif ln == b"content-length":
            cl = v
        elif ln == b"transfer-encoding":
            te = (te or []) + [v]
        elif ln == b"connection":
            conn_values = (conn_values or []) + [v]
        elif ln == b"upgrade":
            upgrade_values = (upgrade_values or []) + [v]
        elif ln == b"x-forwarded-for":
            xff.append(v)
        elif ln == b"x-forwarded-proto":
            xfp = v
        elif ln == b"x-forwarded-host":
            xfh = v
    if version != "1.1" and version != "1.0":
        raise RequestError(505, f"HTTP/{version} is not supported")
    if hosts != 1:
        if hosts > 1:
            raise RequestError(400, "more than one Host header")
        if version == "1.1":
            raise RequestError(400, "missing Host header")
    if host is not None and host != known_host and not HOST_RE.match(host):
        raise RequestError(400, "invalid Host header")
    if te is not None:
        if version == "1.0":
            raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if not is_chunked_only(te):
            raise RequestError(400, "unsupported transfer coding")
        framing, length = "chunked", 0
    elif cl is not None:
        framing, length = "cl", int(cl)
        max_body = server.config.limits.max_body
        if max_body and length > max_body:
            raise RequestError(413, f"request body larger than {max_body} bytes")
    else:
        framing, length = "none", 0
    target = url if url[:1] == b"/" else normalise_target(method, url, host)
    if target.find(b"#") >= 0:
        # a fragment is the client's own business (RFC 9110 §4.2.5): never forwarded
        target = target.partition(b"#")[0]
    upgrade = False
    if upgrade_asked:
        # (llhttp's upgrade includes CONNECT) CONNECT is refused whatever its target
        refuse_method(method)
        # llhttp ends an upgrade request at its head and treats what follows as the new
        # protocol: a body would be read as further requests (smuggling). Refused.
        if framing != "none":
            raise RequestError(400, "a request asking to upgrade cannot carry a body")
    if conn_values is not None:
        tokens = connection_tokens(conn_values)
        fwd = without_named(fwd, tokens)
        if b"upgrade" in tokens and upgrade_values and upgrade_asked:
            wants_ws = any(v.strip().lower() == b"websocket" for v in upgrade_values)
            upgrade = wants_ws and method == "GET" and framing == "none" and version == "1.1"
    path, _, query = target.partition(b"?")
    key: str | None = None
    route_key: str | None = None
    try:
        got = server.router.extractor.extract(headers, path, query, identity)
    except KeyRejected as e:
        extra = b'WWW-Authenticate: Bearer error="invalid_token"\r\n' if e.status == 401 else b""
        raise RequestError(e.status, str(e), extra) from None
    if got is not None:
        key = got.key
    elif server.config.routing.no_key == "reject":
        raise RequestError(400, "request carries no user key")
    elif server.config.routing.no_key == "client-ip":
        route_key = client_address(peer_ip, xff if trusted else [], server)

    # the forwarded head: hop-by-hop fields were left out as they arrived
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    parts += fwd
    if host is None:
        parts.append(b"Host: " + server.default_host + b"\r\n")
    if upgrade:
        parts.append(b"Connection: upgrade\r\nUpgrade: websocket\r\n")
    if server.forwarded:
        if trusted:
            if xff:
                parts.append(b"X-Forwarded-For: " + b", ".join(xff) + b", " + peer_bytes + b"\r\n")
            else:
                parts.append(b"X-Forwarded-For: " + peer_bytes + b"\r\n")
            parts.append(b"X-Forwarded-Proto: " + (xfp or scheme) + b"\r\n")
            fwd_host = xfh or host
        else:
            parts.append(
                b"X-Forwarded-For: " + peer_bytes + b"\r\nX-Forwarded-Proto: " + scheme + b"\r\n"
            )
            fwd_host = host
        if fwd_host:
            parts.append(b"X-Forwarded-Host: " + fwd_host + b"\r\n")
    if identity is not None and server.identity_header:
        # tls.client_identity admits printable ASCII only: safe as a field value
        parts.append(server.identity_header + identity.encode("ascii") + b"\r\n")
    if key is not None:
        parts.append(server.key_header + b": " + key.encode("utf-8") + b"\r\n")
    parts.append(server.ring_header)
    return Request(
        method,
        target,
        version,
        b"".join(parts),
        framing,
        length,
        upgrade,
        key,
        route_key,
        not keep_alive,
        host,
    )


def client_address(peer: str | None, xff: list[bytes], server: Proxy) -> str | None:
    """The client's address: the peer, or behind trusted proxies the rightmost
    X-Forwarded-For entry that is not itself a trusted proxy."""
    if not xff:
        return peer
    hops = [h.strip() for v in xff for h in v.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not server.is_trusted(hop):
            return hop
    return hops[0] if hops else peer
