"""One active health check: an HTTP/1.1 GET on a new connection, its status read, closed;
for a ``protocol = "h2"`` backend the same GET over HTTP/2 (``http2=True``), or the gRPC
health check (grpc.health.v1.Health/Check) when ``health.kind = "grpc"``.

Exactly one attempt per check (a client library that re-sends an idempotent request whose
connection dropped would count a backend that drops every other connection as healthy),
a new connection each time (a check must see what a new connection to the backend sees),
and one deadline over connect, send and the response head. The response is parsed by
llhttp, like the data plane's; the body is not read.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext, SSLError
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from httptools import HttpParserError, HttpResponseParser

from ..discovery.resolver import HostResolver
from ..tls import describe_verify_error

USER_AGENT: Final = b"stickyproxy-health"
# A response head longer than this fails the check (a health endpoint answers briefly).
MAX_HEAD: Final = 64 * 1024
# grpc.health.v1 (grpc/grpc doc/health-checking.md): the method, and the status a serving
# backend answers (HealthCheckResponse.ServingStatus: 1 SERVING, 2 NOT_SERVING, 3
# SERVICE_UNKNOWN).
GRPC_HEALTH_PATH: Final = b"/grpc.health.v1.Health/Check"
_SERVING_STATUS: Final = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
# What a gRPC health answer may hold: a few bytes of protobuf.
MAX_GRPC_BODY: Final = 4096


class ProbeFailed(Exception):
    """The check got no usable answer; the message says why, for the backend's reason."""


class _Head:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def on_headers_complete(self) -> None:
        self.done = True


async def probe(
    host: str,
    port: int,
    path: str,
    timeout: float,
    resolver: HostResolver | None = None,
    ssl: SSLContext | None = None,
    server_hostname: str | None = None,
    *,
    http2: bool = False,
    grpc_service: str | None = None,
) -> int:
    """The status of ``GET path`` on ``host:port``; ProbeFailed when there is none. A host
    name is looked up through ``resolver`` (cached; a slow DNS server then delays only the
    checks of hosts it has never answered for), inside the same deadline. ``http2``: over
    HTTP/2 (prior knowledge, or ALPN "h2" with ``ssl``), and with ``grpc_service`` (None:
    not gRPC) the gRPC health check of that service instead, 200 when it is SERVING."""
    try:
        async with asyncio.timeout(timeout):
            address = host
            if resolver is not None:
                address = (resolver.cached(host) or await resolver.resolve(host))[0]
            reader, writer = await asyncio.open_connection(
                address, port, ssl=ssl, server_hostname=server_hostname if ssl else None
            )
            authority = (f"[{host}]" if ":" in host else host).encode("idna") + b":%d" % port
            try:
                if not http2:
                    return await _http1_exchange(reader, writer, authority, path)
                if ssl is not None:
                    obj = writer.get_extra_info("ssl_object")
                    if obj is None or obj.selected_alpn_protocol() != "h2":
                        raise ProbeFailed("the backend did not choose HTTP/2 (h2) by ALPN")
                return await _h2_exchange(reader, writer, authority, path, ssl, grpc_service)
            finally:
                writer.transport.abort()
    except HttpParserError as e:
        raise ProbeFailed(f"malformed response: {e}") from None
    except (h2.exceptions.ProtocolError, ValueError) as e:
        raise ProbeFailed(f"HTTP/2: {e}") from None
    except SSLError as e:  # before OSError, which it is
        raise ProbeFailed(describe_verify_error(e)) from None
    except TimeoutError:
        raise ProbeFailed(f"no answer within {timeout:g}s") from None
    except ConnectionRefusedError:
        raise ProbeFailed("connection refused") from None
    except OSError as e:
        raise ProbeFailed(e.strerror or type(e).__name__) from None


async def _http1_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: bytes, path: str
) -> int:
    writer.write(
        b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: close\r\n\r\n"
        % (path.encode("ascii"), authority, USER_AGENT)
    )
    head = _Head()
    parser = HttpResponseParser(head)
    seen = 0
    while not head.done:
        data = await reader.read(16384)
        if not data:
            raise ProbeFailed("connection closed before a response")
        seen += len(data)
        if seen > MAX_HEAD:
            raise ProbeFailed("response head too long")
        parser.feed_data(data)
    return parser.get_status_code()


def grpc_health_request(service: str) -> bytes:
    """A gRPC message (length-prefixed, uncompressed) holding HealthCheckRequest{service}:
    protobuf field 1, a string (tag 0x0a, varint length)."""
    name = service.encode("utf-8")
    body = b""
    if name:
        n, varint = len(name), bytearray()
        while True:
            if n < 0x80:
                varint.append(n)
                break
            varint.append((n & 0x7F) | 0x80)
            n >>= 7
        body = b"\x0a" + bytes(varint) + name
    return b"\x00" + len(body).to_bytes(4, "big") + body


def grpc_serving_status(data: bytes) -> int:
    """HealthCheckResponse.status from the response's gRPC message (0 when absent, as
    protobuf leaves a default out); ValueError when it is not one."""
    if len(data) < 5 or data[0] != 0:
        raise ValueError("not an uncompressed gRPC message")
    size = int.from_bytes(data[1:5], "big")
    msg = data[5 : 5 + size]
    if len(msg) != size:
        raise ValueError("gRPC message cut short")
    i = 0
    status = 0
    while i < len(msg):
        tag = msg[i]
        i += 1
        if tag == 0x08:  # field 1, varint
            value, shift = 0, 0
            while True:
                if i >= len(msg) or shift > 28:
                    raise ValueError("bad varint")
                b = msg[i]
                i += 1
                value |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            status = value
        else:
            raise ValueError(f"unexpected protobuf tag {tag:#x}")
    return status


async def _h2_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    authority: bytes,
    path: str,
    ssl: SSLContext | None,
    grpc_service: str | None,
) -> int:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    scheme = b"https" if ssl is not None else b"http"
    grpc = grpc_service is not None
    head = [
        (b":method", b"POST" if grpc else b"GET"),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", GRPC_HEALTH_PATH if grpc else path.encode("ascii")),
        (b"user-agent", USER_AGENT),
    ]
    if grpc:
        head += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, head, end_stream=not grpc)
    if grpc:
        conn.send_data(sid, grpc_health_request(grpc_service or ""), end_stream=True)
    writer.write(conn.data_to_send())
    status = 0
    fields: dict[bytes, bytes] = {}
    body = bytearray()
    while True:
        data = await reader.read(65536)
        if not data:
            raise ProbeFailed("connection closed before a response")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                fields.update(ev.headers)  # type: ignore[arg-type]
                status = int(fields.get(b":status", b"0"))
                if not grpc:
                    return status
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                body += ev.data  # type: ignore[operator]
                if len(body) > MAX_GRPC_BODY:
                    raise ProbeFailed("gRPC health answer too long")
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                fields.update(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                return _grpc_verdict(status, fields, bytes(body))
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                raise ProbeFailed(f"stream reset ({ev.error_code!r})")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                raise ProbeFailed("the backend closed the connection (GOAWAY)")
        out = conn.data_to_send()
        if out:
            writer.write(out)


def _grpc_verdict(status: int, fields: dict[bytes, bytes], body: bytes) -> int:
    if status != 200:
        raise ProbeFailed(f"gRPC health: HTTP status {status}")
    code = fields.get(b"grpc-status")
    if code != b"0":
        msg = fields.get(b"grpc-message", b"").decode("utf-8", "replace")[:100]
        raise ProbeFailed(
            f"gRPC health: grpc-status {(code or b'missing').decode('latin-1')} {msg}".rstrip()
        )
    serving = grpc_serving_status(body)
    if serving != 1:
        raise ProbeFailed(f"gRPC health: {_SERVING_STATUS.get(serving, str(serving))}")
    return 200
