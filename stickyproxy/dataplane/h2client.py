"""HTTP/2 from clients (RFC 9113), forwarded over the HTTP/1.1 upstream pools.

One ``H2ClientProtocol`` per client connection that speaks HTTP/2: chosen by ALPN "h2" on
the TLS listener (``AlpnSwitch``), or by prior knowledge (RFC 9113 §3.3) on a plain
listener with ``listen.h2c`` (``take_over``: client.py hands the connection over when
llhttp stops at the preface). The ``h2`` library does the framing, HPACK, stream states
and flow-control accounting; nothing here writes frames by hand.

How a stream becomes an exchange: its header block is checked by ``parse_request_head``
(pure; RFC 9113 §8.2, §8.3) and given, field by field, to a ``ClientProtocol`` made for
that stream alone, exactly as llhttp would give an HTTP/1.1 request's (the same limits,
field rules, ``build_request``, key extraction and ``Exchange``). That per-stream
``ClientProtocol`` writes its response as HTTP/1.1 bytes to a ``Stream`` standing in for
its transport, which parses them back with llhttp (strict) into HEADERS, DATA and trailers
for this stream: the response framing (Content-Length or chunked) is decoded to DATA, the
connection-specific fields are dropped (RFC 9113 §8.2.2). A ``ClientProtocol`` rather than
another class, because the exchange module is compiled and types its client as one.

Invariants:
- Every DATA byte received is given back to the client's flow-control windows once the
  exchange has taken it, and not before: a stream whose exchange stopped reading (its
  upstream is not keeping up) holds at most its window, ``STREAM_WINDOW``. The connection
  window is as large as all streams' together, so held streams never starve the others.
- A response is sent no faster than the client's windows allow; past
  ``STREAM_BUFFER_HIGH`` buffered bytes the upstream connection stops being read, as for an
  HTTP/1.1 client that does not read.
- A malformed request is a stream error (RST_STREAM PROTOCOL_ERROR, RFC 9113 §8.1.1); a
  request the proxy refuses for HTTP reasons gets the same 4xx an HTTP/1.1 client gets.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from httptools import HttpParserError, HttpResponseParser
from hyperframe.frame import GoAwayFrame

from . import grpc
from .client import CLOSING, DEAD, OPEN, ClientProtocol
from .exchange import refused_exchange
from .h2flow import StreamTransport, send_pending
from .http import HOP_BY_HOP, NO_BODY_STATUSES, RequestError

if TYPE_CHECKING:
    from .proxy import Proxy

log = logging.getLogger("stickyproxy")

# RFC 9113 §3.4: the client connection preface.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# SETTINGS_MAX_CONCURRENT_STREAMS: RFC 9113 §6.5.2 advises at least 100; each stream can
# hold an exchange, an upstream connection and STREAM_WINDOW bytes.
MAX_CONCURRENT_STREAMS: Final = 100
# SETTINGS_INITIAL_WINDOW_SIZE: the protocol default (RFC 9113 §6.9.2); what one stream
# may have in flight towards a backend that is not reading.
STREAM_WINDOW: Final = 65535
# The connection's receive window: every stream's at once, so streams held by slow
# backends cannot stall the others (RFC 9113 §6.9); bounds request bytes held per connection.
CONNECTION_WINDOW: Final = MAX_CONCURRENT_STREAMS * STREAM_WINDOW
# Response bytes buffered per stream beyond the client's window before its upstream stops
# being read, and the level at which reading resumes.
STREAM_BUFFER_HIGH: Final = 64 * 1024
STREAM_BUFFER_LOW: Final = 16 * 1024
# HPACK counts 32 bytes per field on top of name and value (RFC 7541 §4.1): the header
# list allowed is limits.max_header_bytes plus this per field and the request line.
FIELD_OVERHEAD: Final = 32
# Rapid reset (CVE-2023-44487): streams the client cancels while the proxy works on them,
# per RESET_WINDOW seconds, before the connection is closed with ENHANCE_YOUR_CALM. Each
# costs a backend a request and usually a connection; legitimate cancellations are rare.
RESET_WINDOW: Final = 10.0
MAX_RESETS: Final = 100
# SETTINGS and PING frames per CONTROL_WINDOW seconds: each must be answered (RFC 9113
# §6.5.3, §6.7), so a flood is work and output at no cost to the client. Clients send a
# SETTINGS or two per connection and keep-alive PINGs seconds apart.
CONTROL_WINDOW: Final = 10.0
MAX_SETTINGS: Final = 50
MAX_PINGS: Final = 50
# Requests refused as malformed per RESET_WINDOW before the connection is closed: each is
# decoded and answered for nothing (the same flood as a rapid reset, by another frame).
MAX_MALFORMED: Final = 100
# DATA frames without data nor END_STREAM per RESET_WINDOW (CVE-2019-9518): each costs a
# frame's processing and carries nothing; a client has no reason to send many.
MAX_EMPTY_DATA: Final = 100
# WINDOW_UPDATE frames per RESET_WINDOW beyond two per DATA frame sent (a client credits a
# stream and the connection for what it receives): more open no window that is needed,
# and each is processed and may wake every stream.
MAX_SPARE_WINDOW_UPDATES: Final = 100

# RFC 9113 §8.2.2: connection-specific fields are malformed in HTTP/2 requests and never
# sent in responses (TE is allowed with the value "trailers" only).
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
# RFC 9113 §8.3.1: the request pseudo-header fields (":protocol" only with
# SETTINGS_ENABLE_CONNECT_PROTOCOL, which is not offered).
REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
# RFC 9110 §5.1 token, lower case only (RFC 9113 §8.2.1: upper case is malformed).
_NAME_RE: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
# RFC 9110 §5.5: field values are VCHAR, obs-text, SP and HTAB; no other control byte
# (RFC 9113 §8.2.1 names NUL, CR and LF: they would split an HTTP/1.1 head).
_BAD_VALUE_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The method: as client.py forwards an HTTP/1.1 extension method (docs/design.md §7b).
_METHOD_RE: Final = re.compile(rb"^[A-Z0-9_.\-]+$")
# A request target's bytes, as llhttp (strict) accepts them in a request line.
_PATH_RE: Final = re.compile(rb"^[\x21-\x7e]+$")


class Malformed(Exception):
    """A request or trailer section that RFC 9113 §8.1.1 calls malformed: a stream error
    of type PROTOCOL_ERROR. ``str(e)`` says why."""


class H2Head:
    """A request header block checked (``parse_request_head``)."""

    __slots__ = ("method", "path", "host", "fields", "content_length", "refusal")

    def __init__(
        self,
        method: str,
        path: bytes,
        host: bytes | None,
        fields: list[tuple[bytes, bytes]],
        content_length: bool,
        refusal: RequestError | None = None,
    ):
        self.method = method
        self.path = path
        self.host = host  # :authority, else the Host field, else None
        self.fields = fields  # the regular fields, Host left out
        self.content_length = content_length
        self.refusal = refusal  # answered with this instead of being forwarded


def _check_field(name: bytes, value: bytes) -> None:
    if not _NAME_RE.match(name):
        raise Malformed(f"invalid field name {name[:40]!r}")
    if _BAD_VALUE_RE.search(value):
        raise Malformed(f"control character in field {name.decode('latin-1')}")
    if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise Malformed(f"whitespace around the value of field {name.decode('latin-1')}")
    if name in CONNECTION_SPECIFIC:
        raise Malformed(f"connection-specific field {name.decode('latin-1')}")
    if name == b"te" and value.lower() != b"trailers":
        raise Malformed('te other than "trailers"')


def parse_request_head(headers: list[tuple[bytes, bytes]]) -> H2Head:
    """A stream's request header block (as HPACK decoded it, cookies joined by h2,
    RFC 9113 §8.2.3) checked against RFC 9113 §8.2 and §8.3: ``Malformed`` when it is
    malformed; an ``H2Head`` otherwise (with ``refusal`` set for a request the proxy
    answers itself, such as CONNECT: 405 as over HTTP/1.1)."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    host: bytes | None = None
    hosts = 0
    content_length = False
    for name, value in headers:
        if name[:1] == b":":
            if fields:
                raise Malformed("pseudo-header field after a regular field")
            if name not in REQUEST_PSEUDO:
                raise Malformed(f"unknown pseudo-header field {name[:40]!r}")
            if name in pseudo:
                raise Malformed(f"repeated pseudo-header field {name.decode('latin-1')}")
            if _BAD_VALUE_RE.search(value) or value != value.strip(b" \t"):
                raise Malformed(f"invalid value of {name.decode('latin-1')}")
            pseudo[name] = value
            continue
        _check_field(name, value)
        if name == b"host":
            hosts += 1
            host = value
            continue
        if name == b"content-length":
            content_length = True
        fields.append((name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise Malformed("no :method")
    if not _METHOD_RE.match(method):
        raise Malformed("invalid :method")
    authority = pseudo.get(b":authority")
    if method == b"CONNECT":
        # RFC 9113 §8.5: :scheme and :path are omitted, :authority given
        if b":scheme" in pseudo or b":path" in pseudo or authority is None:
            raise Malformed("malformed CONNECT request")
        return H2Head(
            "CONNECT",
            b"",
            authority,
            fields,
            content_length,
            RequestError(405, "CONNECT is not supported"),
        )
    path = pseudo.get(b":path")
    if b":scheme" not in pseudo or not path:
        raise Malformed("no :scheme or :path")
    if not _PATH_RE.match(path) or not (path[:1] == b"/" or path == b"*"):
        raise Malformed("invalid :path")
    if authority is not None:
        # RFC 9113 §8.3.1: no userinfo; a Host field must name the same authority
        if b"@" in authority:
            raise Malformed(":authority with userinfo")
        if host is not None and (hosts > 1 or host.lower() != authority.lower()):
            raise Malformed("Host and :authority differ")
        host = authority
    elif hosts > 1:
        raise Malformed("more than one Host field")
    return H2Head(method.decode("ascii"), path, host, fields, content_length)


def check_trailers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A request trailer section (RFC 9113 §8.1): no pseudo-header fields, and the field
    rules of a header section; ``Malformed`` otherwise."""
    for name, value in headers:
        if name[:1] == b":":
            raise Malformed("pseudo-header field in trailers")
        _check_field(name, value)
    return headers


def response_fields(status: int, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header block of a response head relayed as HTTP/1.1: ``:status`` first,
    names lower-cased, connection-specific fields dropped (RFC 9113 §8.2.2, §8.3.2)."""
    out = [(b":status", b"%d" % status)]
    for name, value in fields:
        ln = name.lower()
        if ln not in HOP_BY_HOP:
            out.append((ln, value))
    return out


class Stream(StreamTransport):
    """One HTTP/2 stream, seen by its ``ClientProtocol`` as that protocol's transport: the
    HTTP/1.1 response written to it is parsed (llhttp) into HEADERS, DATA and trailers;
    pausing it holds back the stream's flow-control credit; closing or aborting it ends or
    resets the stream."""

    def __init__(self, conn: H2ClientProtocol, sid: int, head_only: bool):
        super().__init__(conn)
        self.conn = conn
        self.id = sid
        self.head_only = head_only
        self.client: ClientProtocol = conn.new_stream_client(self)
        self.parser = HttpResponseParser(self)
        self.status = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self.in_trailers = False
        self.trailers: list[tuple[bytes, bytes]] = []
        self.end_pending = False  # the response is complete: END_STREAM once drained
        self.ended = False  # END_STREAM sent (or the stream reset): done
        self.remote_ended = False  # the client sent END_STREAM
        self.stalled_since = 0.0  # data waits, without progress since then
        self.grpc = False  # a gRPC call: errors are gRPC statuses (dataplane/grpc.py)

    # -- the transport its ClientProtocol writes to -------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.ended or self.end_pending or self.conn.conn_state == DEAD:
            return
        try:
            self.parser.feed_data(bytes(data))
        except HttpParserError:  # the proxy's own HTTP/1.1 output: only a bug gets here
            log.exception("HTTP/2 stream %d: cannot relay the response", self.id)
            self.conn.reset_stream(self, ErrorCodes.INTERNAL_ERROR)
            return
        self.conn.push(self)

    def close(self) -> None:
        # the response was written whole (END_STREAM follows once the window allows),
        # or it never will be
        if not (self.ended or self.end_pending):
            self.conn.reset_stream(self, ErrorCodes.CANCEL)

    def abort(self) -> None:
        # a response cut short (a backend failed mid-body): never passed off as complete
        if self.ended:
            return
        if self.grpc:
            # a gRPC call ends with a status: what arrived is sent, then UNAVAILABLE
            self.grpc_error(502, "the backend failed during the call")
            return
        self.pending.clear()
        self.conn.reset_stream(self, ErrorCodes.INTERNAL_ERROR)

    def grpc_error(self, status: int, reason: str) -> None:
        """A proxy-made error for a gRPC call (``ClientProtocol.local_answer``): a
        trailers-only response with the gRPC status for ``status`` (dataplane/grpc.py)."""
        if self.ended or self.end_pending:
            return
        if self.status >= 200:
            # the response began: its trailers carry the status, after what was relayed
            self.in_trailers = False
            self.trailers = grpc.cut_short_trailers(reason)
            self.end_pending = True
            self.conn.push(self)
            return
        self.status = 200
        self.end_pending = True
        self.conn.send_headers(self, grpc.error_fields(status, reason), True)
        self.conn.push(self)  # flushes (this may run outside a read: a timer's deadline)

    def is_closing(self) -> bool:
        return self.ended

    # -- llhttp callbacks (the HTTP/1.1 response this stream's exchange relays) ----------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            self.trailers.append((name.lower(), value))
        else:
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        fields, self.fields = self.fields, []
        conn = self.conn
        if status < 200:
            # 1xx (100 Continue, 103 Early Hints) go out as informational HEADERS
            conn.send_headers(self, response_fields(status, fields), False)
            return
        self.status = status
        for name, value in fields:
            if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
                # a transfer coding (gzip, ...) besides chunked: HTTP/2 has no way to say
                # so (RFC 9113 §8.2.2), and the bytes would be taken for the content
                log.warning(
                    "HTTP/2 stream %d: backend response has transfer coding %r",
                    self.id,
                    value.decode("latin-1"),
                )
                conn.reset_stream(self, ErrorCodes.INTERNAL_ERROR)
                return
        if self.head_only or status in NO_BODY_STATUSES:
            # no body follows (RFC 9110 §9.3.2, §15.3.5, §15.4.5); llhttp cannot know HEAD's
            self.end_pending = True
            conn.send_headers(self, response_fields(status, fields), True)
            return
        self.in_trailers = True
        conn.send_headers(self, response_fields(status, fields), False)

    def on_body(self, body: bytes) -> None:
        self.pending.append(body)
        self.pending_bytes += len(body)

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.end_pending = True


class H2ClientProtocol(asyncio.Protocol):
    """One HTTP/2 client connection (see the module's docstring)."""

    def __init__(self, server: Proxy):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        # OPEN → CLOSING → DEAD, as a ClientProtocol's (client.py): CLOSING once the
        # connection is being closed (no frame is read any more), DEAD once it is gone
        self.conn_state = OPEN
        # GOAWAY facts, not states: the streams already taken go on finishing in OPEN
        self.draining = False  # shutdown sent GOAWAY: no new stream is taken
        self.goaway_sent = False  # a GOAWAY went out (shutdown, or a connection error)
        self.peer_goaway = False  # the client sent GOAWAY
        self.write_paused = False
        self.in_read = False
        self.flush_pending = False  # a flush_now is scheduled
        self.peer_ip: str | None = None
        self.peer_bytes = b""
        self.trusted = False
        self.scheme = b"http"
        self.identity: str | None = None
        self.deadline = 0.0  # the preface and first request, then idle
        self.window_start = 0.0  # counters below count since then
        self.resets = 0
        self.malformed = 0
        self.settings_frames = 0
        self.pings = 0
        self.empty_data = 0
        self.window_updates = 0
        self.data_frames = 0  # DATA frames sent in the current window
        self.conn_stalled_since = 0.0
        self.progress_at = 0.0  # DATA last sent while more waited
        limits = server.config.limits
        self.header_list = (
            limits.max_header_bytes
            + limits.max_request_line
            + FIELD_OVERHEAD * (limits.max_headers + len(REQUEST_PSEUDO))
        )
        # inbound fields are checked by parse_request_head (stream errors, not h2's
        # connection errors); outbound ones are made by response_fields from llhttp's
        # parse (lower-cased names, no connection-specific field, no CR/LF/NUL possible):
        # h2's own passes over them would only cost time
        cfg = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.header_list,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        # enforced from the first header block, not only once the client acknowledged
        self.h2.decoder.max_header_list_size = self.header_list
        # h2 closes its side at the client's GOAWAY and then refuses every frame, so the
        # streams the client still expects answers on (RFC 9113 §6.8: up to its
        # last_stream_id, and all of ours) would fail: its state machine stays open
        sm = self.h2.state_machine
        sm._transitions = {
            **sm._transitions,
            (
                h2.connection.ConnectionState.SERVER_OPEN,
                h2.connection.ConnectionInputs.RECV_GOAWAY,
            ): (None, h2.connection.ConnectionState.SERVER_OPEN),
        }

    # -- start ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """HTTP/2 chosen by ALPN: a new connection."""
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else None
        self.peer_bytes = (self.peer_ip or "").encode("ascii")
        self.trusted = server.is_trusted(self.peer_ip)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.scheme = b"https"
            self.identity = server.client_identity(ssl_object)
        if not server.client_opened(self):
            self.conn_state = DEAD  # never counted open: connection_lost has nothing to undo
            transport.close()
            return
        self._start(b"")

    def adopt(self, client: ClientProtocol, data: bytes) -> None:
        """HTTP/2 by prior knowledge: take over ``client``'s connection, whose first bytes
        ``data`` start with the preface."""
        self.transport = client.transport
        self.peer_ip, self.peer_bytes = client.peer_ip, client.peer_bytes
        self.trusted, self.scheme, self.identity = client.trusted, client.scheme, client.identity
        clients = self.server.clients
        clients.discard(client)
        clients.add(self)  # the same connection: counted by client_opened already
        self._start(data)

    def _start(self, data: bytes) -> None:
        self.deadline = time.monotonic() + self.server.config.timeouts.client_header
        self.window_start = time.monotonic()
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        if data:
            self.data_received(data)
        else:
            self.flush_now()

    def new_stream_client(self, stream: Stream) -> ClientProtocol:
        """The ``ClientProtocol`` one stream's exchange answers through."""
        c = ClientProtocol(self.server)
        c.transport = stream
        c.peer_ip, c.peer_bytes, c.trusted = self.peer_ip, self.peer_bytes, self.trusted
        c.scheme, c.identity = self.scheme, self.identity
        return c

    # -- input ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.conn_state != OPEN:
            return
        self.in_read = True
        try:
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                # h2 queued a GOAWAY naming the error (RFC 9113 §5.4.1)
                log.debug("HTTP/2 connection error from %s: %s", self.peer_ip, e)
                self.goaway_sent = True
                self._close()
                return
            if self._header_block_too_large():
                self.calm("header block too large")
                return
            for ev in events:
                if self.conn_state != OPEN:
                    break
                self._event(ev)
        finally:
            self.in_read = False
            self.flush_now()

    def _header_block_too_large(self) -> bool:
        """A header block still waiting for END_HEADERS (CONTINUATION frames, RFC 9113
        §6.10) larger than the header list allowed: h2 holds it whole until it ends."""
        frames = getattr(self.h2.incoming_buffer, "_headers_buffer", None)
        if not frames:
            return False
        return sum(len(f.data) for f in frames) > self.header_list

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            self._data(ev)
        elif isinstance(ev, h2.events.RequestReceived):
            self._request(ev)
        elif isinstance(ev, h2.events.StreamEnded):
            stream = self.streams.get(ev.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream.remote_ended = True
                stream.client.on_message_complete()
        elif isinstance(ev, h2.events.TrailersReceived):
            self._trailers(ev)
        elif isinstance(ev, h2.events.WindowUpdated):
            self.window_updates += 1
            if self.window_updates > MAX_SPARE_WINDOW_UPDATES + 2 * self.data_frames:
                self.calm("WINDOW_UPDATE flood")
                return
            if ev.stream_id:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    self.push(stream)
            else:
                self.push_all()
        elif isinstance(ev, h2.events.StreamReset):
            self._peer_reset(ev.stream_id)  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings_frames += 1
            if self.settings_frames > MAX_SETTINGS:
                self.calm("SETTINGS flood")
                return
            self.push_all()  # SETTINGS_INITIAL_WINDOW_SIZE may have opened windows
        elif isinstance(ev, h2.events.PingReceived):
            self.pings += 1
            if self.pings > MAX_PINGS:
                self.calm("PING flood")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            # the client's GOAWAY: its streams up to last_stream_id still finish
            self.peer_goaway = True
            if not self.streams:
                self._close()

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid: int = ev.stream_id  # type: ignore[assignment]
        h2c = self.h2
        if self.draining or len(self.streams) >= MAX_CONCURRENT_STREAMS:
            # after GOAWAY (RFC 9113 §6.8): refused, and safe for the client to retry. The
            # limit itself h2 enforces first, as a connection error (§5.1.2 asks for a
            # stream error: docs/http2.md); the count here only guards the same bound
            h2c.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            head = parse_request_head(ev.headers)  # type: ignore[arg-type]
        except Malformed as e:
            log.debug("HTTP/2 stream %d from %s malformed: %s", sid, self.peer_ip, e)
            self.server.events.request_rejected(400)
            h2c.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            self.malformed += 1
            if self.malformed > MAX_MALFORMED:
                self.calm("malformed request flood")
            return
        self.deadline = 0.0
        stream = Stream(self, sid, head.method == "HEAD")
        self.streams[sid] = stream
        for name, value in head.fields:
            if name == b"content-type":
                if grpc.is_grpc(value):
                    stream.grpc = True
                    stream.client.local_answer = stream.grpc_error
                break
        ended = bool(ev.stream_ended)
        stream.remote_ended = ended
        c = stream.client
        c.on_message_begin()
        try:
            if head.refusal is not None:
                raise head.refusal
            c.on_url(head.path)
            for name, value in head.fields:
                c.on_header(name, value)
            if head.host is not None:
                c.on_header(b"host", head.host)
            if not ended and not head.content_length:
                # a body of unknown length: chunked on the HTTP/1.1 hop (RFC 9113 §8.1)
                c.on_header(b"transfer-encoding", b"chunked")
            c.in_head = False
            c.requests = 1
            ex = c._build(head.method, "1.1", True)
        except RequestError as err:
            c.in_head = False
            ex = refused_exchange(c, err.status, err.reason, err.extra)
            self.server.events.request_rejected(err.status)
            c.to_closing()
        c.receiving = None if ended else ex
        c._enqueue(ex)

    def _data(self, ev: h2.events.DataReceived) -> None:
        sid: int = ev.stream_id  # type: ignore[assignment]
        size: int = ev.flow_controlled_length  # type: ignore[assignment]
        stream = self.streams.get(sid)
        if stream is None or stream.ended:
            # a stream already answered or refused: its bytes are dropped and credited
            self.credit(sid, size)
            return
        data: bytes = ev.data  # type: ignore[assignment]
        if not data:
            # an empty DATA frame (END_STREAM alone, or padding only) carries no body
            # bytes; given on, it would be an empty chunk, which ends an HTTP/1.1 body
            self.credit(sid, size)
            if not ev.stream_ended:
                self.empty_data += 1
                if self.empty_data > MAX_EMPTY_DATA:
                    self.calm("empty DATA frame flood")
            return
        stream.client.on_body(data)
        stream.received(size)

    def _trailers(self, ev: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(ev.stream_id)  # type: ignore[arg-type]
        if stream is None:
            return
        try:
            fields = check_trailers(ev.headers)  # type: ignore[arg-type]
        except Malformed:
            self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
            return
        c = stream.client
        if c.receiving is not None:
            for name, value in fields:
                c.on_header(name, value)  # kept on the exchange (client.py's rules)

    def _peer_reset(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        stream.ended = True
        stream.pending.clear()
        stream.client.connection_lost(None)  # the exchange is aborted
        self.resets += 1
        if self.resets > MAX_RESETS:
            self.calm("rapid reset")

    def credit(self, sid: int, size: int) -> None:
        """Give ``size`` received bytes back to the client's windows (RFC 9113 §6.9)."""
        if size and self.conn_state != DEAD:
            self.h2.acknowledge_received_data(size, sid)
            if not self.in_read:
                self.flush()

    # -- output --------------------------------------------------------------------------
    def send_headers(self, stream: Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.h2.send_headers(stream.id, headers, end_stream=end)
        except (h2.exceptions.ProtocolError, ValueError, TypeError) as e:
            log.warning("HTTP/2 stream %d: response head not sendable: %s", stream.id, e)
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
            return
        if end:
            self._stream_done(stream)

    def push(self, stream: Stream) -> None:
        """Send what the windows allow of ``stream``'s response, then its end."""
        if stream.ended:
            if not self.in_read:
                self.flush()  # what ended it (HEADERS with END_STREAM, a reset)
            return
        pending = stream.pending
        trailers = response_fields_trailers(stream.trailers) if stream.trailers else None
        try:
            n, frames, ended = send_pending(
                self.h2, stream.id, pending, not self.write_paused, stream.end_pending, trailers
            )
        except (h2.exceptions.ProtocolError, ValueError) as e:
            log.debug("HTTP/2 stream %d: %s", stream.id, e)
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
            return
        stream.pending_bytes -= n
        self.data_frames += frames
        sent = frames > 0
        if ended:
            self._stream_done(stream)
        if not pending:
            stream.stalled_since = 0.0
        elif sent or not stream.stalled_since:
            # data waits (for a window, or for the socket): the stall clock runs from the
            # last progress, so a slow but moving download is never taken for a stall
            stream.stalled_since = self.progress_at = time.monotonic()
        stream.backpressure(stream.client, STREAM_BUFFER_HIGH, STREAM_BUFFER_LOW)
        if not self.in_read:
            self.flush()

    def push_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending or stream.end_pending:
                self.push(stream)

    def _stream_done(self, stream: Stream) -> None:
        """The response went out whole: the stream is finished here."""
        stream.ended = True
        self.streams.pop(stream.id, None)
        if stream.write_paused:
            stream.write_paused = False
        if stream.unacked:
            n, stream.unacked = stream.unacked, 0
            self.credit(stream.id, n)
        if not stream.remote_ended:
            # RFC 9113 §8.1: the rest of the request is not needed
            try:
                self.h2.reset_stream(stream.id, ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        self._after_stream()

    def reset_stream(self, stream: Stream, code: ErrorCodes) -> None:
        """End ``stream`` with RST_STREAM ``code``; its exchange, if still running, is
        aborted."""
        if stream.ended:
            return
        stream.ended = True
        stream.pending.clear()
        self.streams.pop(stream.id, None)
        try:
            self.h2.reset_stream(stream.id, code)
        except h2.exceptions.ProtocolError:
            pass
        if stream.unacked:
            n, stream.unacked = stream.unacked, 0
            self.credit(stream.id, n)
        stream.client.connection_lost(None)
        if not self.in_read:
            self.flush()
        self._after_stream()

    def _after_stream(self) -> None:
        if not self.streams:
            if self.draining or self.peer_goaway:
                self._close()
            elif self.conn_state == OPEN:
                self.deadline = time.monotonic() + self.server.config.timeouts.client_idle

    def flush(self) -> None:
        """Write h2's output soon: once per loop turn, however many streams added to it (a
        read's worth of responses is one send, not one per stream)."""
        if not self.flush_pending and self.conn_state != DEAD:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self.flush_pending = False
        data = self.h2.data_to_send()
        t = self.transport
        if data and t is not None and self.conn_state != DEAD:
            t.write(data)

    # -- asyncio.Protocol ----------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.push_all()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.conn_state == DEAD:
            return
        self.conn_state = DEAD
        self.deadline = 0.0
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.ended = True
            stream.client.connection_lost(exc)
        self.server.client_closed(self)

    # -- time and shutdown ---------------------------------------------------------------
    def on_tick(self, now: float) -> None:
        if self.conn_state != OPEN:
            return
        if now - self.window_start > min(RESET_WINDOW, CONTROL_WINDOW):
            self.window_start = now
            self.resets = self.malformed = self.settings_frames = self.pings = 0
            self.empty_data = self.window_updates = self.data_frames = 0
        if not self.streams:
            if self.deadline and now > self.deadline:
                self._close()
            return
        stall = self.server.config.timeouts.body_idle
        h2c = self.h2
        conn_shut = h2c.outbound_flow_control_window <= 0 and any(
            s.pending for s in self.streams.values()
        )
        if conn_shut:
            # the connection's own window stays shut: the client's doing, not one stream's
            if not self.conn_stalled_since:
                self.conn_stalled_since = now
            elif now - max(self.conn_stalled_since, self.progress_at) > stall:
                self.calm("connection flow-control window stayed 0")
                return
        else:
            self.conn_stalled_since = 0.0
        for stream in list(self.streams.values()):
            if not conn_shut and stream.stalled_since and now - stream.stalled_since > stall:
                # the client does not open this stream's window: its response is dropped
                self.reset_stream(stream, ErrorCodes.CANCEL)
                continue
            if not stream.ended:
                stream.client.on_tick(now)

    def calm(self, why: str) -> None:
        """Close the connection with GOAWAY ENHANCE_YOUR_CALM (RFC 9113 §7): the client
        abuses the protocol (``why``)."""
        if self.conn_state != OPEN:
            return
        log.warning("HTTP/2 connection from %s closed: %s", self.peer_ip, why)
        self.server.events.request_rejected(429)
        try:
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, additional_data=why.encode())
        except h2.exceptions.ProtocolError:
            pass
        self.goaway_sent = True
        self._close()

    def shutdown(self) -> None:
        """Graceful stop: GOAWAY naming the last stream taken (RFC 9113 §6.8); streams up
        to it finish; the connection closes when none is left."""
        if self.conn_state != OPEN:
            return
        if not self.draining:
            self.draining = True
            self._goaway(ErrorCodes.NO_ERROR)
        if not self.streams:
            self._close()

    def _goaway(self, code: ErrorCodes) -> None:
        """A GOAWAY that leaves h2's connection open, so that streams already taken still
        finish (h2's own close_connection refuses every frame after it)."""
        self.flush_now()
        frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=code)
        self.goaway_sent = True
        if self.transport is not None and self.conn_state != DEAD:
            self.transport.write(frame.serialize())

    def _close(self, abort: bool = False) -> None:
        if self.conn_state == DEAD:
            return
        self.conn_state = CLOSING
        self.deadline = 0.0
        t = self.transport
        if t is None:
            return
        if abort:
            t.abort()
            return
        if not self.goaway_sent:
            self._goaway(ErrorCodes.NO_ERROR)
        self.flush_now()
        t.close()


def response_fields_trailers(trailers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response trailers for HTTP/2: no pseudo-headers, no framing or connection fields."""
    return [(n, v) for n, v in trailers if n not in HOP_BY_HOP and n != b"content-length"]


class AlpnSwitch(asyncio.Protocol):
    """The TLS listener's protocol until the handshake is done (asyncio calls
    ``connection_made`` after it): HTTP/2 when ALPN chose "h2" (RFC 7301, RFC 9113 §3.2),
    else HTTP/1.1. Replaced at once; it never sees a byte."""

    __slots__ = ("server",)

    def __init__(self, server: Proxy):
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        proto: asyncio.Protocol
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            proto = H2ClientProtocol(self.server)
        else:
            proto = ClientProtocol(self.server)
        transport.set_protocol(proto)
        proto.connection_made(transport)


def take_over(client: ClientProtocol, data: bytes) -> None:
    """client.py's hook (``listen.h2c``): ``client``'s connection began with the HTTP/2
    preface (``data``: from its first byte, as far as read). From here it is HTTP/2."""
    transport = client.transport
    assert transport is not None
    client.handed_over()
    proto = H2ClientProtocol(client.server)
    transport.set_protocol(proto)
    proto.adopt(client, data if data.startswith(PREFACE[:16]) else PREFACE[:16] + data)
