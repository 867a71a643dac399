"""HTTP/2 to backends (RFC 9113): the backends configured with ``protocol = "h2"``, by prior
knowledge on an http:// URL (§3.3) or by ALPN "h2" on an https:// one (§3.2). gRPC
needs it (trailers, streaming both ways).

The shape: an exchange talks to a backend through an ``UpstreamProtocol`` and its
transport, whatever the backend speaks. For an HTTP/2 backend that transport is a
``H2Stream``, one stream on a shared ``H2Conn``: the HTTP/1.1 request the exchange
writes is parsed back (llhttp, strict) into HEADERS, DATA and trailers; the stream's
response is given to the ``UpstreamProtocol`` as HTTP/1.1 bytes (chunked when it has no
Content-Length, its trailers as the chunked trailer section). So routing, retries,
timeouts, passive health, metrics and the access log are the HTTP/1.1 ones, unchanged;
HTTP/2 from clients (h2client.py) does the mirror image. ``H2Pool`` is the backend's
set of connections: a stream goes on the first connection with room (the backend's
SETTINGS_MAX_CONCURRENT_STREAMS, at most ``MAX_STREAMS``), else a new connection is made.

Invariants:
- A response DATA byte is credited back to the backend's windows only once the exchange
  took it and was not holding the stream (its client is not keeping up): flow control is
  end to end, and a backend can have at most ``STREAM_WINDOW`` bytes waiting per stream.
- A request is sent no faster than the backend's windows allow; past
  ``SEND_BUFFER_HIGH`` unsent bytes the exchange stops reading its client.
- A stream the backend refused (REFUSED_STREAM, or above a GOAWAY's last stream id) was
  not processed (RFC 9113 §8.7); it fails like a reset connection, and the exchange's
  retry rules decide (retried when replayable).
- A response is passed on only as the backend framed it: a body shorter than its
  Content-Length or a stream reset mid-response fails the exchange, never completes it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from .h2flow import StreamTransport, send_pending
from .http import HOP_BY_HOP, NO_BODY_STATUSES
from .upstream import UpstreamProtocol

if TYPE_CHECKING:
    from ..discovery.resolver import HostResolver
    from .upstream import Upstream

log = logging.getLogger("stickyproxy")


class UpstreamGone(ConnectionResetError):
    """An HTTP/2 stream (or its connection) lost for a reason the proxy knows and says in
    its 502: "stream reset by the backend (REFUSED_STREAM)". Not in upstream.py: mypyc
    cannot compile a subclass of a built-in exception."""


# Streams opened on one connection at most, whatever the backend allows: bounds what one
# connection's loss costs and what its connection window is shared by.
MAX_STREAMS: Final = 100
# The receive window per stream: response bytes the backend may send ahead of the client
# reading them (RFC 9113 §6.9.2); the connection's is every stream's at once, so a
# stream held by a slow client never stalls the others.
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = MAX_STREAMS * STREAM_WINDOW
# Request bytes buffered per stream beyond the backend's window before the exchange stops
# reading its client, and the level at which it resumes.
SEND_BUFFER_HIGH: Final = 64 * 1024
SEND_BUFFER_LOW: Final = 16 * 1024
# The largest response header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE).
MAX_HEADER_LIST: Final = 64 * 1024

# RFC 9113 §8.2.2: fields an HTTP/1.1 request carries that HTTP/2 must not (TE is sent as
# "te: trailers" alone: the proxy relays trailers, and gRPC servers ask for it).
_REQUEST_DROP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
        b"http2-settings",
    }
)
# A gRPC trailers-only response (HEADERS with END_STREAM) carries its status in the head;
# over HTTP/1.1 these travel as the trailer section of an empty chunked body.
_STATUS_FIELDS: Final = frozenset({b"grpc-status", b"grpc-message", b"grpc-status-details-bin"})
_CRLF: Final = b"\r\n"
# ssl.SSLError.reason for a TLS backend that did not choose h2 (tls.describe_verify_error)
NO_H2_ALPN: Final = "NO_H2_ALPN"


def request_fields(
    method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], scheme: bytes
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header block for an HTTP/1.1 request head the exchange built (RFC 9113
    §8.3.1): pseudo-header fields first, Host as :authority, names lower-cased,
    connection-specific fields dropped and "te: trailers" added."""
    authority = b""
    out: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        ln = name.lower()
        if ln in _REQUEST_DROP:
            if ln == b"host":
                authority = value
            continue
        out.append((ln, value))
    if target[:1] != b"/" and target != b"*":
        # absolute-form (RFC 9112 §3.2.2): authority and path from the URI
        rest = target.split(b"://", 1)[-1]
        slash = rest.find(b"/")
        authority = authority or (rest if slash < 0 else rest[:slash])
        target = b"/" if slash < 0 else rest[slash:]
    head = [(b":method", method), (b":scheme", scheme), (b":authority", authority)]
    head.append((b":path", target))
    head += out
    head.append((b"te", b"trailers"))
    return head


def response_head(
    headers: list[tuple[bytes, bytes]], ended: bool, head_only: bool
) -> tuple[bytes, str]:
    """An HTTP/2 response header block as an HTTP/1.1 response head, and how its body is
    framed on that hop: "chunked", "cl" or "none" (nothing follows the head). ``ended``:
    END_STREAM came with it. A trailers-only gRPC response (RFC 9113 §8.1, gRPC's
    Trailers-Only) becomes an empty chunked body whose trailers hold the status."""
    status = 0
    lines: list[bytes] = []
    moved: list[bytes] = []
    cl: bytes | None = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":status":
                status = int(value)
            continue
        if name == b"content-length":
            cl = value
            continue
        if name in HOP_BY_HOP:
            continue
        line = name + b": " + value + _CRLF
        if ended and name in _STATUS_FIELDS:
            moved.append(line)
        else:
            lines.append(line)
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = b"-"
    head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase), *lines]
    if status < 200:
        return b"".join(head) + _CRLF, "none"
    if head_only or status in NO_BODY_STATUSES:
        if cl is not None:
            head.append(b"content-length: " + cl + _CRLF)
        return b"".join(head) + _CRLF, "none"
    if ended:
        if moved:
            head.append(b"transfer-encoding: chunked\r\n\r\n0\r\n")
            return b"".join(head) + b"".join(moved) + _CRLF, "none"
        return b"".join(head) + b"content-length: 0\r\n\r\n", "none"
    if cl is not None:
        head.append(b"content-length: " + cl + b"\r\n\r\n")
        return b"".join(head), "cl"
    head.append(b"transfer-encoding: chunked\r\n\r\n")
    return b"".join(head), "chunked"


class H2Stream(StreamTransport):
    """One request/response on an ``H2Conn``, seen by its ``UpstreamProtocol`` as that
    protocol's transport (see the module's docstring)."""

    def __init__(self, conn: H2Conn, proto: UpstreamProtocol):
        super().__init__(conn)
        self.conn = conn
        self.proto = proto
        self.parser = HttpRequestParser(self)
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.head: list[tuple[bytes, bytes]] | None = None  # built, not yet sent
        self.in_trailers = False
        self.trailers: list[tuple[bytes, bytes]] = []
        self.end_pending = False  # the request is complete: END_STREAM once drained
        self.local_ended = False
        self.remote_ended = False
        self.closed = False
        # the response body on the HTTP/1.1 hop: "", "chunked", "cl", "none"; h2 holds a
        # "cl" body to its content-length (RFC 9113 §8.1.1) before any byte reaches us
        self.framing = ""
        self.resp_done = False
        self.upgrade = False

    # -- the transport its UpstreamProtocol writes to ------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(bytes(data))
        except HttpParserUpgrade:
            # RFC 8441's extended CONNECT is not used: no WebSocket over HTTP/2 upstreams
            self._refuse("a WebSocket upgrade cannot be carried to an HTTP/2 backend")
            return
        except HttpParserError as e:  # the proxy's own HTTP/1.1 output: only a bug
            log.error("HTTP/2 upstream: cannot relay the request: %s", e)
            self._refuse("request not expressible in HTTP/2")
            return
        if self.head is not None:
            self._send_head(end=False)
        self.conn.push(self)

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self._end(ErrorCodes.CANCEL)

    def abort(self) -> None:
        self._end(ErrorCodes.CANCEL)

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return self.pending_bytes

    def _end(self, code: ErrorCodes) -> None:
        """The exchange let go of this stream: reset it if either side is still open (the
        response ended before the request: RFC 9113 §8.1), and tell the protocol."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.conn.stream_closed(self, code)
        asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    def _refuse(self, why: str) -> None:
        """The request cannot go to this backend: the exchange answers 502 without
        blaming it (its connection is not at fault)."""
        ex = self.proto.exchange
        self.closed = True
        self.conn.stream_closed(self, ErrorCodes.CANCEL)
        if ex is not None:
            asyncio.get_running_loop().call_soon(ex.cannot_relay, why)

    # -- llhttp callbacks (the HTTP/1.1 request its exchange sends) ----------------------
    def on_message_begin(self) -> None:
        self.target = b""
        self.fields = []
        self.in_trailers = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            ln = name.lower()
            if ln not in _REQUEST_DROP and ln != b"content-length":
                self.trailers.append((ln, value))
        else:
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        fields, self.fields = self.fields, []
        self.in_trailers = True
        if self.parser.should_upgrade():
            self.upgrade = True  # refused once llhttp stops (write)
            return
        scheme = b"https" if self.conn.pool.slot.ssl is not None else b"http"
        self.head = request_fields(self.parser.get_method(), self.target, fields, scheme)

    def on_body(self, body: bytes) -> None:
        if self.head is not None:
            self._send_head(end=False)
        self.pending.append(body)
        self.pending_bytes += len(body)

    def on_message_complete(self) -> None:
        if self.upgrade:
            return
        if self.head is not None:
            # no body: the request is its head (HEADERS with END_STREAM)
            self._send_head(end=True)
            return
        self.end_pending = True

    def _send_head(self, end: bool) -> None:
        head, self.head = self.head, None
        assert head is not None
        if not self.conn.send_head(self, head, end) and not self.closed:
            # reported after the write returns: the exchange is still inside ``attach``
            asyncio.get_running_loop().call_soon(
                self._lost, UpstreamGone("the HTTP/2 connection to the backend closed")
            )

    # -- the response, from H2Conn -------------------------------------------------------
    def on_response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        data, framing = response_head(headers, ended, self.proto.head_only)
        self.framing = framing
        if framing == "none":
            self.resp_done = True
        self._feed(data)

    def on_informational(self, headers: list[tuple[bytes, bytes]]) -> None:
        data, _ = response_head(headers, False, False)
        self._feed(data)

    def on_data(self, data: bytes, flow: int) -> None:
        if self.framing == "chunked":
            if data:
                self._feed(b"%x\r\n%s\r\n" % (len(data), data))
        elif self.framing == "cl":
            self._feed(data)
        if self.closed:
            self.conn.credit(self.id, flow)
        else:
            self.received(flow)

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.framing != "chunked":
            # a Content-Length body has no trailer section on HTTP/1.1 (RFC 9112 §7.1.2)
            log.debug("HTTP/2 upstream stream %d: trailers after a sized body dropped", self.id)
            return
        self.resp_done = True
        lines = [n + b": " + v + _CRLF for n, v in headers if n[:1] != b":"]
        self._feed(b"0\r\n" + b"".join(lines) + _CRLF)

    def on_end(self) -> None:
        self.remote_ended = True
        if self.resp_done or self.closed:
            return
        if self.framing == "chunked":
            self.resp_done = True
            self._feed(b"0\r\n\r\n")
        elif self.framing == "cl":
            self.resp_done = True
        elif not self.framing:
            self._lost(UpstreamGone("stream ended without a response"))

    def _feed(self, data: bytes) -> None:
        if not self.closed:
            self.proto.data_received(data)

    def _lost(self, exc: BaseException | None) -> None:
        """The stream failed (reset, refused, its connection lost): the exchange sees its
        connection lost and applies its rules."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.conn.stream_closed(self, ErrorCodes.CANCEL)
        self.proto.connection_lost(exc)


class H2Conn(asyncio.Protocol):
    """One HTTP/2 connection to a backend: its streams, windows and GOAWAY state."""

    def __init__(self, pool: H2Pool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.reserved = 0  # streams handed out and not closed (some not yet started)
        self.opened = 0  # streams handed out in the connection's life
        self.closed = False
        self.goaway = False  # no new stream (the backend's GOAWAY, or retiring)
        self.write_paused = False
        self.in_read = False
        self.flush_pending = False  # a flush_now is scheduled
        self.idle_since = time.monotonic()
        cfg = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=cfg)
        # h2 closes its side at the backend's GOAWAY and then refuses every frame, so the
        # streams the backend still answers (RFC 9113 §6.8: up to its last_stream_id)
        # would fail: its state machine stays open, and no new stream is opened here
        sm = self.h2.state_machine
        sm._transitions = {
            **sm._transitions,
            (
                h2.connection.ConnectionState.CLIENT_OPEN,
                h2.connection.ConnectionInputs.RECV_GOAWAY,
            ): (None, h2.connection.ConnectionState.CLIENT_OPEN),
        }
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )

    def has_room(self) -> bool:
        if self.closed or self.goaway or self.opened >= self.pool.max_requests:
            return False
        limit = min(MAX_STREAMS, self.h2.remote_settings.max_concurrent_streams)
        return self.reserved < limit

    def new_stream(self) -> UpstreamProtocol:
        proto = UpstreamProtocol(self.pool.slot, time.monotonic())
        proto.connection_made(H2Stream(self, proto))
        self.reserved += 1
        self.opened += 1
        return proto

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush_now()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.in_read = True
        try:
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                log.warning("HTTP/2 backend %s: protocol error: %s", self.pool.slot.id, e)
                self._fail(UpstreamGone(f"HTTP/2 protocol error: {e}"))
                return
            for ev in events:
                self._event(ev)
        finally:
            self.in_read = False
            self.flush_now()

    def _event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", 0)
        stream = self.streams.get(sid) if sid else None
        if isinstance(ev, h2.events.DataReceived):
            flow: int = ev.flow_controlled_length  # type: ignore[assignment]
            if stream is None:
                self.credit(sid, flow)
            else:
                stream.on_data(ev.data, flow)  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.ResponseReceived):
            if stream is not None:
                stream.on_response(ev.headers, ev.stream_ended is not None)  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.TrailersReceived):
            if stream is not None:
                stream.on_trailers(ev.headers)  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.StreamEnded):
            if stream is not None:
                stream.on_end()
                self._maybe_done(stream)
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            if stream is not None:
                stream.on_informational(ev.headers)  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.StreamReset):
            if stream is not None:
                code = ev.error_code
                name = getattr(code, "name", str(code))
                if stream.remote_ended and stream.resp_done:
                    # RFC 9113 §8.1: the response is complete and the rest of the request
                    # is not wanted (NO_ERROR): the exchange ends as it would have
                    self.streams.pop(sid, None)
                    return
                stream._lost(UpstreamGone(f"stream reset by the backend ({name})"))
        elif isinstance(ev, h2.events.WindowUpdated):
            if sid:
                if stream is not None:
                    self.push(stream)
            else:
                self.push_all()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.push_all()  # SETTINGS_INITIAL_WINDOW_SIZE may have opened windows
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway(ev.last_stream_id or 0)  # type: ignore[arg-type]

    def _goaway(self, last: int) -> None:
        """The backend's GOAWAY (RFC 9113 §6.8): streams above ``last`` were not processed
        and fail; the others may still finish; no new stream is opened here."""
        self.goaway = True
        for sid, stream in list(self.streams.items()):
            if sid > last:
                stream._lost(UpstreamGone("stream refused by the backend's GOAWAY"))
        if not self.streams:
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._fail(exc or UpstreamGone("the backend closed the HTTP/2 connection"))

    def _fail(self, exc: BaseException, abort: bool = True) -> None:
        """The connection is over: its open streams fail with ``exc``."""
        if not self.closed:
            self.closed = True
            self.pool.lost(self)
        for stream in list(self.streams.values()):
            stream._lost(exc)
        self.streams.clear()
        t = self.transport
        if t is not None:
            self.transport = None
            if abort:
                t.abort()
            else:
                t.close()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.push_all()

    def eof_received(self) -> bool:
        return False

    # -- streams ---------------------------------------------------------------------------
    def send_head(self, stream: H2Stream, head: list[tuple[bytes, bytes]], end: bool) -> bool:
        """Open ``stream`` with its HEADERS; False when the connection cannot take it."""
        if self.closed:
            return False
        try:
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, head, end_stream=end)
        except (h2.exceptions.ProtocolError, ValueError) as e:
            log.debug("HTTP/2 backend %s: cannot open a stream: %s", self.pool.slot.id, e)
            return False
        stream.id = sid
        stream.local_ended = end
        self.streams[sid] = stream
        if not self.in_read:
            self.flush()
        return True

    def push(self, stream: H2Stream) -> None:
        """Send what the windows allow of ``stream``'s request body, then its end."""
        if stream.closed or not stream.id:
            return
        try:
            n, _, ended = send_pending(
                self.h2,
                stream.id,
                stream.pending,
                not self.write_paused,
                stream.end_pending and not stream.local_ended,
                stream.trailers or None,
            )
        except (h2.exceptions.ProtocolError, ValueError) as e:
            log.debug("HTTP/2 backend %s stream %d: %s", self.pool.slot.id, stream.id, e)
            stream._lost(UpstreamGone(f"HTTP/2 stream failed: {e}"))
            return
        stream.pending_bytes -= n
        if ended:
            stream.local_ended = True
        stream.backpressure(stream.proto, SEND_BUFFER_HIGH, SEND_BUFFER_LOW)
        if stream.local_ended:
            self._maybe_done(stream)
        if not self.in_read:
            self.flush()

    def push_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending or stream.end_pending:
                self.push(stream)

    def _maybe_done(self, stream: H2Stream) -> None:
        """Both sides ended: the stream is closed on the wire (its transport may still be
        held by the exchange until it lets go)."""
        if stream.local_ended and stream.remote_ended:
            self.streams.pop(stream.id, None)

    def stream_closed(self, stream: H2Stream, code: ErrorCodes) -> None:
        """``stream``'s exchange let go of it (or it failed): reset it if still open."""
        self.reserved -= 1
        if stream.id and self.streams.pop(stream.id, None) is not None and not self.closed:
            try:
                self.h2.reset_stream(stream.id, code)
            except h2.exceptions.ProtocolError:
                pass
            if not self.in_read:
                self.flush()
        if stream.unacked:
            n, stream.unacked = stream.unacked, 0
            self.credit(stream.id, n)
        if not self.reserved:
            self.idle_since = time.monotonic()
            if (self.goaway or self.opened >= self.pool.max_requests) and not self.closed:
                self.close()  # retired, or served its limits.pool_max_requests streams

    def credit(self, sid: int, size: int) -> None:
        """Give ``size`` received bytes back to the backend's windows (RFC 9113 §6.9)."""
        if size and not self.closed:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except (h2.exceptions.ProtocolError, KeyError):
                # the stream is gone: the connection window still gets them back
                self.h2.increment_flow_control_window(size)
            if not self.in_read:
                self.flush()

    def flush(self) -> None:
        """Write h2's output soon: once per loop turn, however many streams added to it
        (the requests of one client read go out in one send, not one or more each)."""
        if not self.flush_pending and self.transport is not None:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self.flush_pending = False
        t = self.transport
        if t is None:
            return
        data = self.h2.data_to_send()
        if data:
            t.write(data)

    def close(self) -> None:
        """GOAWAY and close; streams still open fail (callers close idle connections)."""
        if self.closed:
            return
        try:
            self.h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self.flush_now()
        self._fail(UpstreamGone("the HTTP/2 connection to the backend was closed"), False)

    def retire(self) -> None:
        """No new stream here; close once the open ones are done."""
        self.goaway = True
        if not self.reserved:
            self.close()


class H2Pool:
    """The HTTP/2 connections to one backend (its ``Upstream.h2pool``)."""

    def __init__(self, slot: Upstream):
        self.slot = slot
        self.conns: list[H2Conn] = []
        self.dialing: asyncio.Future[H2Conn] | None = None
        self.max_requests = slot.max_requests
        self.idle_timeout = slot.idle_timeout

    def configure(self, max_requests: int, idle_timeout: float) -> None:
        self.max_requests, self.idle_timeout = max_requests, idle_timeout

    def acquire(self) -> UpstreamProtocol | None:
        """A new stream on a connection with room for it, or None (``connect`` then)."""
        for conn in self.conns:
            if conn.has_room():
                return conn.new_stream()
        return None

    async def connect(self, resolver: HostResolver) -> UpstreamProtocol:
        """A new stream, on a new connection if none has room; one connection is made at a
        time per backend, and exchanges waiting for it share it. Raises what
        ``loop.create_connection`` raises (the caller bounds the time)."""
        while True:
            proto = self.acquire()
            if proto is not None:
                return proto
            if self.dialing is None:
                self.dialing = asyncio.ensure_future(self._dial(resolver))
            await asyncio.shield(self.dialing)

    async def _dial(self, resolver: HostResolver) -> H2Conn:
        slot = self.slot
        try:
            loop = asyncio.get_running_loop()
            addrs = resolver.cached(slot.host) or await resolver.resolve(slot.host)
            transport, conn = await loop.create_connection(
                lambda: H2Conn(self),
                addrs[0],
                slot.port,
                ssl=slot.ssl,
                server_hostname=slot.server_hostname,
            )
            if slot.ssl is not None:
                ssl_object = transport.get_extra_info("ssl_object")
                if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                    transport.abort()
                    err = ssl.SSLError("the backend did not choose h2 by ALPN")
                    err.reason = NO_H2_ALPN  # type: ignore[attr-defined]
                    raise err
            self.conns.append(conn)
            slot.connected()
            return conn
        finally:
            self.dialing = None

    def lost(self, conn: H2Conn) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            return
        self.slot.open -= 1

    def sweep(self, now: float) -> None:
        for conn in list(self.conns):
            if not conn.reserved and now - conn.idle_since > self.idle_timeout:
                conn.close()

    def close_all(self) -> None:
        """Close the connections without streams; the others take no new stream and close
        when their last one ends."""
        for conn in list(self.conns):
            conn.retire()
