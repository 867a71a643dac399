"""The client side: one protocol object per client connection, parsing with llhttp.

Invariants:
- Responses go out in request order. Exchanges queue per connection and run one at a
  time; the queue is bounded (``limits.max_pipeline``): past it, input is not parsed and
  the socket is not read until the queue drains.
- A request is forwarded only after its whole head parsed and validated; anything
  malformed is answered 4xx and the connection closed without contacting a backend.
- Reading stops for as long as any reason holds (a full queue, a full upstream buffer, a
  body waiting for its connection, a pending upgrade): reasons are bits, not a flag.
- A connection's life is one state that only moves forward, OPEN → CLOSING → DEAD
  (``conn_state``; ``to_closing``, ``connection_lost``, ``handed_over``): once CLOSING no
  request is parsed or forwarded any more, once DEAD nothing is written.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from . import proxy_protocol
from .exchange import DONE, PENDING, RESPONDING, Exchange, refused_exchange
from .http import (
    FIELD_FORWARD,
    FIELD_SPECIAL,
    FORWARDED,
    HOP_BY_HOP,
    PREFACE_PAUSE,
    STAND_IN_METHOD,
    RequestError,
    error_response,
    rewrite_request_line,
)
from .request import build_request

if TYPE_CHECKING:
    from .proxy import Proxy
    from .tunnel import Tunnel

log = logging.getLogger("stickyproxy")

# Request fields the proxy looks at before forwarding: hop-by-hop ones are never forwarded
# (RFC 9110 §7.6.1), framing ones are re-made, X-Forwarded-* are set by the proxy, Host is
# checked (and forwarded).
REQUEST_WATCH: Final = HOP_BY_HOP | FORWARDED | {b"content-length", b"host"}

# Input is parsed in slices this large, so a burst of tiny pipelined requests can overrun
# the queue bound by at most one slice's worth.
FEED_SLICE: Final = 16 * 1024

# Output pieces totalling at most this are joined into one buffer before sending.
FLUSH_JOIN_LIMIT: Final = 16 * 1024

# ClientProtocol.conn_state, in the only order a connection passes them (never back):
# OPEN     requests are parsed, forwarded and answered;
# CLOSING  no further request is parsed or forwarded: the ones already queued are answered
#          (or aborted) in order, then the transport closes;
# DEAD     the transport is gone (connection_lost), or belongs to HTTP/2 now (handed_over):
#          nothing is written, no exchange starts.
OPEN: Final = 0
CLOSING: Final = 1
DEAD: Final = 2


class ClientProtocol(asyncio.Protocol):
    PAUSE_PIPELINE = 1
    PAUSE_BACKPRESSURE = 2
    PAUSE_BODY = 4
    PAUSE_UPGRADE = 8
    PAUSE_STOPPED = 16

    __slots__ = (
        "server",
        "transport",
        "parser",
        "queue",
        "pauses",
        "stash",
        "deadline",
        "deadline_kind",
        "peer_ip",
        "trusted",
        "url",
        "headers",
        "head_bytes",
        "in_head",
        "receiving",
        "conn_state",
        "tunnel",
        "write_paused",
        "limit_error",
        "advancing",
        "requests",
        "feeding",
        "eof",
        "batch",
        "out",
        "fwd",
        "special",
        "peer_bytes",
        "limits",
        "valid_host",
        "idle_timeout",
        "head_pending",
        "start_pending",
        "max_header_bytes",
        "max_headers",
        "line_buf",
        "ext_method",
        "head_tail",
        "body_left",
        "body_mark",
        "scheme",
        "identity",
        "local_answer",
    )

    def __init__(self, server: Proxy):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.pauses = 0
        self.stash = b""
        self.deadline = 0.0
        self.deadline_kind = ""
        self.peer_ip: str | None = None
        self.trusted = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.fwd: list[bytes] = []
        self.special: list[tuple[bytes, bytes]] = []
        self.peer_bytes = b""
        self.scheme = b"http"  # b"https" on a [listen.tls] connection
        self.identity: str | None = None  # its verified client certificate's identity
        # answers a proxy-made error in the client's protocol instead of as text/plain
        # (a gRPC call on an HTTP/2 stream: h2client.py); None: error_response
        self.local_answer: Callable[[int, str], None] | None = None
        self.limits = server.config.limits
        self.max_header_bytes = self.limits.max_header_bytes
        self.max_headers = self.limits.max_headers
        self.valid_host: bytes | None = None
        self.idle_timeout = server.config.timeouts.client_idle
        self.head_pending = 0
        self.start_pending = False
        self.head_bytes = 0
        self.in_head = False
        self.receiving: Exchange | None = None
        self.conn_state = OPEN
        self.tunnel: Tunnel | None = None
        self.write_paused = False
        self.limit_error: RequestError | None = None
        self.advancing = False
        self.requests = 0
        self.feeding = False
        self.eof = False
        self.batch = 0
        self.out: list[bytes] = []
        self.line_buf = b""  # the start of a request line llhttp must see whole
        self.ext_method = ""  # the method to forward in place of llhttp's stand-in
        self.head_tail = b""  # the last bytes fed of a head a read left incomplete
        # a slice that starts inside a Content-Length body: the body bytes still to come
        # (-1 when not known: a chunked body) and the requests parsed before that slice
        self.body_left = -1
        self.body_mark = 0

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else None
        self.peer_bytes = (self.peer_ip or "").encode("ascii")
        server = self.server
        self.limits = limits = server.config.limits
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.trusted = server.is_trusted(self.peer_ip)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.scheme = b"https"
            self.identity = server.client_identity(ssl_object)
        if not server.client_opened(self):
            self.to_closing()
            transport.write(error_response(503, "too many connections", close=True))  # type: ignore[attr-defined]
            transport.close()
            return
        self.deadline = time.monotonic() + server.config.timeouts.client_header
        self.deadline_kind = "header"

    def proxied(self, ip: str) -> None:
        """The client is ``ip``, as a trusted load balancer's PROXY header says: it stands
        for the peer in X-Forwarded-For and ``no_key = "client-ip"``, and is itself judged
        against ``trusted_proxies`` (the balancer vouches for the header, not for an
        X-Forwarded-For the client wrote)."""
        self.peer_ip = ip
        self.peer_bytes = ip.encode("ascii")
        self.trusted = self.server.is_trusted(ip)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.conn_state != OPEN:
            return
        if self.line_buf:
            if (
                data.find(b"\n") < 0
                and len(self.line_buf) + len(data) <= self.limits.max_request_line
            ):
                self.line_buf += data  # still no whole line: nothing is parsed again
                return
            data, self.line_buf = self.line_buf + data, b""
        if self.stash or self.pauses & (self.PAUSE_PIPELINE | self.PAUSE_UPGRADE):
            self.stash += data
            return
        self.batch += 1
        try:
            if len(data) > FEED_SLICE or self.queue:
                self._feed(data)
            else:
                # the common case: one small request on an idle connection
                self.feeding = True
                # where this read starts, for _retry_line: at a message (the requests parsed
                # before it), or inside a head (-2 minus them)
                mark = -2 - self.requests if self.in_head else self.requests
                try:
                    self.parser.feed_data(data)
                    if self.in_head:
                        self._head_progress(len(data), data, mark)
                except HttpParserUpgrade as e:
                    self.feeding = False
                    self._after_upgrade_request(data[e.args[0] :])
                except HttpParserError as e:
                    self._parse_failed(e, data, b"", mark)
                self.feeding = False
                if self.start_pending:
                    self._start_pending()
        finally:
            self.feeding = False
            self.batch -= 1
            if not self.batch and self.out:
                self.flush()

    def eof_received(self) -> bool:
        # A half-closed client may still be owed responses to requests it already sent.
        # TLS has no half-close (the transport closes after close_notify whatever this
        # returns, and warns if it returns True).
        self.eof = True
        if self.tunnel is not None or not self.queue or self.scheme == b"https":
            return False
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.conn_state == DEAD:
            return
        self.conn_state = DEAD
        self.deadline = 0.0
        if self.tunnel is not None:
            self.tunnel.close()
        while self.queue:
            self.queue.popleft().abort()
        self.server.client_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.client_write_paused()
        elif self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.client_write_resumed()
        elif self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.resume_reading()

    # -- input ---------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self.feeding = True
        try:
            self._feed_slices(data)
        finally:
            self.feeding = False
        if self.start_pending:
            self._start_pending()

    def _feed_slices(self, data: bytes) -> None:
        view = memoryview(data) if len(data) > FEED_SLICE else data
        max_pipeline = self.server.config.limits.max_pipeline
        pos = 0
        n = len(data)
        while pos < n:
            if len(self.queue) >= max_pipeline and not self.in_head and self.receiving is None:
                self.stash = bytes(view[pos:])
                self.pause_reading(self.PAUSE_PIPELINE)
                return
            end = min(n, pos + FEED_SLICE)
            chunk = view[pos:end] if (pos or end < n) else data
            receiving = self.receiving
            if receiving is not None:
                mark = -1
                self.body_mark = self.requests
                self.body_left = (
                    receiving.content_length - receiving.body_seen
                    if receiving.framing == "cl"
                    else -1
                )
            else:
                mark = -2 - self.requests if self.in_head else self.requests
            try:
                self.parser.feed_data(chunk)
                if self.in_head:
                    self._head_progress(end - pos, chunk, mark)
            except HttpParserUpgrade as e:
                rest = bytes(view[pos + e.args[0] :])
                self.feeding = False
                if self.start_pending:
                    self._start_pending()
                self._after_upgrade_request(rest)
                return
            except HttpParserError as e:
                self._parse_failed(e, bytes(chunk), bytes(view[end:]), mark)
                return
            if self.conn_state != OPEN:
                return
            if self.line_buf:
                # a request line held back whole (_head_progress) continues in the next slice
                if end < n:
                    rest, self.line_buf = self.line_buf + bytes(view[end:]), b""
                    self._feed_slices(rest)
                return
            pos = end

    def _head_progress(self, n: int, fed: bytes | memoryview, mark: int) -> None:
        """Count bytes fed while a request head is incomplete. llhttp reports a field only
        once it ends, so a field that never ends must be caught here (431). A request line
        cut by the end of the input is held back (``line_buf``) and fed again whole with
        what follows, so that a line llhttp refuses can be rewritten (``_retry_line``)."""
        self.head_pending += n
        limits = self.limits
        if self.head_pending > limits.max_header_bytes + limits.max_request_line:
            self.limit_error = RequestError(431, "request header fields too large")
            raise HttpParserError("request head too large")
        if mark >= 0 and not self.headers:
            data = bytes(fed)
            start = _message_start(data, self.requests - mark)
            if start >= 0 and data.find(b"\n", start) < 0:
                if len(data) - start > limits.max_request_line:
                    self.limit_error = RequestError(414, "request target too long")
                    raise HttpParserError("request line too long")
                self.line_buf = data[start:]
                self.parser = HttpRequestParser(self)
                self.in_head = False
                return
        tail = bytes(fed[-3:])
        self.head_tail = (self.head_tail + tail)[-3:] if mark <= -2 else tail
        if self.url and fed[-1:] == b"\n" and self.parser.get_http_version() in ("0.0", "0.9"):
            # the request line ended without a version: an HTTP/0.9 request, which llhttp
            # would leave waiting for fields until the header deadline
            self.limit_error = RequestError(400, "request line has no HTTP version")
            raise HttpParserError("HTTP/0.9 request")

    def _parse_failed(self, e: HttpParserError, fed: bytes, more: bytes, mark: int) -> None:
        """llhttp refused the slice ``fed`` (``more`` is the input after it; ``mark``: the
        requests parsed before it, or -1 if it did not start a message): go on with a
        fresh parser from a rewritten request line (``_retry_line``), or answer 400."""
        if self.requests == 0 and self.server.config.listen.h2c and str(e) == PREFACE_PAUSE:
            # listen.h2c: the connection began with the HTTP/2 preface (RFC 9113 §3.3;
            # llhttp stops at its request line): it is HTTP/2 from its first byte
            from .h2client import take_over

            take_over(self, fed + more)
            return
        line = self._retry_line(e, fed, mark)
        if line is None:
            self._parse_error(e)
            return
        self.parser = HttpRequestParser(self)
        self.in_head = False
        if more:
            if line:
                line += more
            else:
                line, self.line_buf = self.line_buf + more, b""
        if line:
            self._feed_slices(line)

    def _retry_line(self, e: HttpParserError, fed: bytes, mark: int) -> bytes | None:
        """llhttp refused ``fed``: the input to feed a fresh parser instead when what it
        refused is a valid request line it does not know (http.rewrite_request_line),
        ``b""`` when that line is still incomplete (kept in ``line_buf``), or None.

        The failing message must have begun in ``fed`` after body-less messages only, so
        that its start is found exactly: past one head (ended by the first empty line,
        RFC 9112 §2.1) per request parsed from ``fed``. Bodies are never searched.
        """
        if self.limit_error is not None or not self.in_head:
            return None
        unknown_method = isinstance(e, HttpParserInvalidMethodError)
        if not unknown_method and str(e) != "Invalid HTTP version":
            return None
        if mark >= 0:
            start = _message_start(fed, self.requests - mark)
        elif mark == -1:
            # the slice began inside a body: only a Content-Length one's end is known
            left = self.body_left
            if left < 0 or left > len(fed):
                return None
            rest = _message_start(fed[left:], self.requests - self.body_mark)
            start = -1 if rest < 0 else left + rest
        else:
            start = self._start_after_head_in_progress(fed, self.requests - (-2 - mark))
        if start < 0:
            return None
        end = fed.find(b"\n", start)
        if end < 0:
            if len(fed) - start > self.limits.max_request_line:
                self.limit_error = RequestError(414, "request target too long")
                return None
            self.line_buf = fed[start:]
            return b""
        got = rewrite_request_line(fed[start : end + 1], unknown_method)
        if got is None:
            return None
        line, method = got
        if unknown_method:
            self.ext_method = method
        return line + fed[end + 1 :]

    def _start_after_head_in_progress(self, fed: bytes, parsed: int) -> int:
        """Where the message after ``parsed`` ones starts in ``fed``, which began inside the
        head of the first of them (its end may straddle the reads: ``head_tail``); -1 when
        that cannot be known exactly."""
        queue = self.queue
        if parsed < 1 or len(queue) < parsed:
            return -1
        tail = self.head_tail
        end = (tail + fed).find(b"\r\n\r\n")
        if end < 0:
            return -1
        # its body, stepped over by the framing its exchange was built with
        ex = queue[len(queue) - parsed]
        pos = end + 4 - len(tail)
        if ex.framing == "cl":
            pos += ex.content_length
        elif ex.framing == "chunked":
            pos = _past_chunks(fed, pos)
        if pos < 0 or pos > len(fed):
            return -1
        rest = _message_start(fed[pos:], parsed - 1)
        return -1 if rest < 0 else pos + rest

    def _after_upgrade_request(self, rest: bytes) -> None:
        ex = self.queue[-1] if self.queue else None
        if ex is not None and ex.upgrade and ex.state != DONE:
            # Until the backend answers, bytes after the upgrade request are held: they
            # are tunnel data after a 101, or the next request after any other answer.
            self.stash = rest
            self.pause_reading(self.PAUSE_UPGRADE)
            return
        if rest and self.conn_state == OPEN:
            self._feed(rest)

    def _parse_error(self, e: Exception) -> None:
        err = self.limit_error
        if err is None:
            err = RequestError(400, f"malformed request: {_parser_reason(e)}")
        self.limit_error = None
        self.in_head = False
        receiving, self.receiving = self.receiving, None
        self.pause_reading(self.PAUSE_STOPPED)
        self.server.events.request_rejected(err.status)
        if receiving is not None and receiving.local is None:
            # the body of a request already routed is malformed: that request is the one
            # answered (or cut short); the backend did nothing wrong
            self.to_closing()
            receiving.client_failed(err.status, err.reason)
            return
        self._enqueue(refused_exchange(self, err.status, err.reason))
        self.to_closing()

    # -- llhttp callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = []
        self.fwd = []
        self.special = []
        self.head_bytes = 0
        self.head_pending = 0
        if self.deadline_kind != "header":
            self.deadline = time.monotonic() + self.server.client_header_timeout
            self.deadline_kind = "header"

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line:
            self.limit_error = RequestError(414, "request target too long")
            raise self.limit_error

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(name) + len(value) + 4
            headers = self.headers
            if self.head_bytes > self.max_header_bytes or len(headers) >= self.max_headers:
                self.limit_error = RequestError(431, "request header fields too large")
                raise self.limit_error
            ln, kind, lead = self.server.request_field(name)
            headers.append((ln, value))
            if kind != FIELD_FORWARD:
                self.special.append((ln, value))
                if kind == FIELD_SPECIAL:
                    return
            self.fwd.append(lead + value + b"\r\n")
        elif self.receiving is not None:
            # a trailer field of a chunked request body (RFC 9112 §7.1.2): the fields the
            # proxy sets, strips or frames are not accepted from trailers either
            ln = name.lower()
            server = self.server
            if ln not in server.request_watch and not ln.startswith(server.header_prefix_lower):
                ex = self.receiving
                if ex.req_trailers is None:
                    ex.req_trailers = []
                ex.req_trailers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.deadline = 0.0
        self.deadline_kind = ""
        if self.conn_state != OPEN:
            # a request pipelined behind one that closes the connection is never answered,
            # so it is never forwarded either
            self.receiving = None
            return
        parser = self.parser
        self.requests += 1
        raw_method = parser.get_method()
        if raw_method == STAND_IN_METHOD and self.ext_method:
            method, self.ext_method = self.ext_method, ""
        else:
            method = raw_method.decode("ascii")
        try:
            ex = self._build(method, parser.get_http_version(), parser.should_keep_alive())
        except RequestError as err:
            ex = refused_exchange(self, err.status, err.reason, err.extra)
            self.server.events.request_rejected(err.status)
            self.closing_after_parse()
        self.receiving = ex
        self._enqueue(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.receiving
        if ex is None or ex.local is not None:
            return
        max_body = self.server.config.limits.max_body
        if max_body and ex.body_seen + len(body) > max_body:
            self._body_too_large(ex)
            return
        ex.on_request_body(body)

    def on_message_complete(self) -> None:
        ex = self.receiving
        self.receiving = None
        if ex is not None:
            ex.on_request_complete()
        if not self.queue and not self.in_head:
            self._set_idle()

    # -- request building ----------------------------------------------------------------
    def _build(self, method: str, version: str, keep_alive: bool) -> Exchange:
        req = build_request(
            self.server,
            method,
            version,
            keep_alive,
            self.url,
            self.headers,
            self.special,
            self.fwd,
            self.parser.should_upgrade(),
            self.peer_ip,
            self.peer_bytes,
            self.trusted,
            self.valid_host,
            self.scheme,
            self.identity,
        )
        if req.host is not None:
            self.valid_host = req.host
        ex = Exchange(
            self,
            req.method,
            req.target,
            req.version,
            req.head,
            req.framing,
            req.length,
            req.upgrade,
            req.key,
        )
        if req.route_key is not None:
            ex.route_key = req.route_key
        if req.close_after:
            ex.close_after = True
        return ex

    def closing_after_parse(self) -> None:
        """Stop reading: the request that just parsed will be answered and the connection
        closed, so nothing after it may be parsed or forwarded."""
        self.pause_reading(self.PAUSE_STOPPED)
        self.to_closing()

    def to_closing(self) -> None:
        """OPEN → CLOSING: no further request is parsed or forwarded (those queued are still
        answered). Past OPEN it changes nothing: a connection never moves back."""
        if self.conn_state == OPEN:
            self.conn_state = CLOSING

    def handed_over(self) -> None:
        """→ DEAD without connection_lost's clean-up: the connection now belongs to another
        protocol (HTTP/2 took it over, h2client.take_over), which is counted in its place."""
        self.conn_state = DEAD
        self.deadline = 0.0

    def _body_too_large(self, ex: Exchange) -> None:
        self.closing_after_parse()
        self.receiving = None
        reason = f"request body larger than {self.server.config.limits.max_body} bytes"
        if ex.state == PENDING and self.queue and self.queue[0] is not ex:
            ex.answer_locally(413, reason)
            ex.body_buf = []
        elif ex.state == RESPONDING:
            ex.error_kind = "body-too-large"
            ex.finish(abort_client=True)
        elif ex.state != DONE:
            self.respond_local(ex, 413, reason, close=True)

    # -- the queue -----------------------------------------------------------------------
    def _enqueue(self, ex: Exchange) -> None:
        self.queue.append(ex)
        if len(self.queue) == 1:
            self.deadline = 0.0
            self.deadline_kind = ""
            if self.feeding:
                # llhttp may still reject this head once the callback returns (some checks
                # run after on_headers_complete): start it when the read has been parsed
                self.start_pending = True
            else:
                ex.begin()

    def _start_pending(self) -> None:
        self.start_pending = False
        queue = self.queue
        if queue and self.conn_state != DEAD and queue[0].state == PENDING:
            queue[0].begin()

    def exchange_done(self, ex: Exchange, abort: bool = False) -> None:
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if not (
            queue
            or abort
            or ex.close_after
            or self.pauses
            or self.stash
            or self.conn_state != OPEN
            or self.eof
            or self.advancing
            or self.server.stopping
        ):
            # the common case: a keep-alive connection with nothing else to do
            if not self.in_head and self.receiving is None:
                self.deadline = time.monotonic() + self.idle_timeout
                self.deadline_kind = "idle"
            return
        if self.conn_state == DEAD:
            return
        if abort:
            self._close(abort=True)
            return
        if (
            ex.close_after
            or (self.conn_state != OPEN or self.eof or self.server.stopping)
            and not queue
        ):
            self._close()
            return
        if ex.upgrade and self.pauses & self.PAUSE_UPGRADE:
            # the backend did not switch protocols: held bytes are the next request
            self.pauses &= ~self.PAUSE_UPGRADE
        if self.advancing:
            return
        self.advancing = True
        try:
            while queue and self.conn_state != DEAD:
                head = queue[0]
                if head.state != PENDING:
                    break
                head.begin()
                if queue and queue[0] is head:
                    break
        finally:
            self.advancing = False
        if self.conn_state != OPEN:
            if not queue:
                self._close()
            return
        if not queue and not self.in_head and self.receiving is None:
            self._set_idle()
        if (
            self.pauses & self.PAUSE_PIPELINE
            and len(queue) < self.server.config.limits.max_pipeline
        ):
            self.pauses &= ~self.PAUSE_PIPELINE
        if (
            self.stash
            and not self.feeding
            and not self.pauses & (self.PAUSE_PIPELINE | self.PAUSE_UPGRADE)
        ):
            data, self.stash = self.stash, b""
            self._feed(data)
        self._apply_pauses()

    def _set_idle(self) -> None:
        self.deadline = time.monotonic() + self.idle_timeout
        self.deadline_kind = "idle"

    def must_close_after(self, ex: Exchange) -> bool:
        return (
            ex.close_after
            or self.server.stopping
            or (self.conn_state != OPEN and len(self.queue) <= 1)
        )

    def respond_local(
        self, ex: Exchange, status: int, reason: str, close: bool, extra: bytes = b""
    ) -> None:
        """Answer ``ex`` with a proxy-made response (only when it is at the queue head)."""
        close = close or self.must_close_after(ex)
        ex.status = status
        ex.close_after = close
        answer = self.local_answer
        if answer is not None:
            answer(status, reason)
        else:
            data = error_response(
                status, reason, close=close, head_only=ex.method == "HEAD", extra=extra
            )
            ex.resp_bytes = len(data) - data.index(b"\r\n\r\n") - 4
            self.write(data)
        if close:
            self.to_closing()
        ex.finish()

    def start_tunnel(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.deadline = 0.0
        self.pauses &= ~self.PAUSE_UPGRADE
        if self.queue:
            self.queue.popleft()
        if self.stash:
            data, self.stash = self.stash, b""
            tunnel.from_client(data)
        self._apply_pauses()

    # -- flow control --------------------------------------------------------------------
    def pause_reading(self, reason: int) -> None:
        before = self.pauses
        self.pauses |= reason
        if not before and self.transport is not None and self.conn_state != DEAD:
            self.transport.pause_reading()

    def resume_reading(self, reason: int) -> None:
        if not self.pauses & reason:
            return
        self.pauses &= ~reason
        self._apply_pauses()

    def _apply_pauses(self) -> None:
        t = self.transport
        if t is None or self.conn_state == DEAD:
            return
        if self.pauses:
            t.pause_reading()
        elif not t.is_reading():
            t.resume_reading()

    # Output is batched while a read is processed (a response head and its body usually
    # arrive in one read): one send per read instead of one per piece.
    def write(self, data: bytes) -> None:
        if self.conn_state == DEAD or self.transport is None:
            return
        if self.batch:
            self.out.append(data)
        else:
            self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        if self.conn_state == DEAD or self.transport is None:
            return
        if self.batch:
            self.out.extend(parts)
        else:
            self.transport.writelines(parts)

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and self.conn_state != DEAD and self.transport is not None:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                # one buffer is cheaper for the loop than many small ones; large bodies
                # are not copied
                total = 0
                for part in out:
                    total += len(part)
                if total <= FLUSH_JOIN_LIMIT:
                    self.transport.write(b"".join(out))
                else:
                    self.transport.writelines(out)

    # -- time ----------------------------------------------------------------------------
    def on_tick(self, now: float) -> None:
        if self.tunnel is not None:
            if self.tunnel.idle_expired(now, self.server.config.timeouts.websocket_idle):
                self.tunnel.close()
            return
        if self.queue:
            ex = self.queue[0]
            if ex.deadline and now > ex.deadline:
                ex.on_deadline(now)
            return
        if self.deadline and now > self.deadline:
            if self.deadline_kind == "header" and (self.in_head or self.requests == 0):
                if self.in_head or self.head_bytes or self.url:
                    self.server.events.request_rejected(408)
                    self._reply_and_close(408, "request head not received in time")
                else:
                    self._close()
            else:
                self._close()

    def _reply_and_close(self, status: int, reason: str) -> None:
        self.to_closing()
        self.write(error_response(status, reason, close=True))
        self._close()

    def _close(self, abort: bool = False) -> None:
        self.to_closing()
        self.deadline = 0.0
        t = self.transport
        if t is None or self.conn_state == DEAD:
            return
        if abort:
            self.out = []
            t.abort()
        else:
            self.flush()
            t.close()

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the current response."""
        if self.tunnel is None and not self.queue and not self.in_head:
            self._close()


def _message_start(data: bytes, parsed: int) -> int:
    """Where the message after the first ``parsed`` ones in ``data`` starts, ``data``
    starting at a message boundary; -1 when that cannot be known exactly.

    Each head ends at its first empty line (RFC 9112 §2.1) and its body is stepped over by
    its own framing (RFC 9112 §6.3), never searched: llhttp has accepted these messages,
    so their framing is exactly one of none, one Content-Length, or chunked."""
    start = _skip_empty_lines(data, 0)
    for _ in range(parsed):
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            return -1
        start = _past_body(data, data[start : end + 2].lower(), end + 4)
        if start < 0:
            return -1
        start = _skip_empty_lines(data, start)
    return start


# The framing fields of a request head llhttp accepted (lower-cased; at line starts).
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*\r\n")
_CHUNKED: Final = re.compile(rb"\r\ntransfer-encoding:[^\r]*\r\n")


def _past_body(data: bytes, head: bytes, pos: int) -> int:
    """Where the body that follows ``head`` (lower-cased, ending in CRLF) at ``pos`` ends;
    -1 when that is not known (not all of it in ``data``, or a field name appears in a
    value and the framing cannot be read unambiguously)."""
    if head.count(b"content-length") + head.count(b"transfer-encoding") == 0:
        return pos
    if (
        _CHUNKED.search(head) is not None
        and head.count(b"transfer-encoding") == 1
        and b"content-length" not in head
    ):
        return _past_chunks(data, pos)
    m = _CONTENT_LENGTH.search(head)
    if m is None or head.count(b"content-length") != 1 or b"transfer-encoding" in head:
        return -1
    end = pos + int(m[1])
    return end if end <= len(data) else -1


def _past_chunks(data: bytes, pos: int) -> int:
    """Past a chunked body llhttp accepted (RFC 9112 §7.1): chunks, the last chunk, the
    trailer section and its empty line; -1 when not all of it is in ``data``."""
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size_text = data[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return -1
        pos = eol + 2
        if size == 0:
            break
        pos += size + 2
        if pos > len(data):
            return -1
    while True:  # trailer fields, then the empty line
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return -1
        if eol == pos:
            return pos + 2
        pos = eol + 2


def _skip_empty_lines(data: bytes, pos: int) -> int:
    """Past the empty lines a server ignores before a request line (RFC 9112 §2.2)."""
    while data[pos : pos + 2] == b"\r\n":
        pos += 2
    return pos


def _parser_reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.replace("`", "")[:80]


class ProxyHeaderProtocol(asyncio.Protocol):
    """``listen.proxy_protocol``: a connection from a trusted load balancer starts with a
    PROXY protocol header (dataplane/proxy_protocol.py), read here before any HTTP; the
    connection then becomes an ordinary ``ClientProtocol`` whose peer is the client the header
    names. A trusted peer without a valid header is closed without an answer (the spec
    forbids guessing, §2); other peers are handed over at once and never get a header
    honoured (one that sends one gets llhttp's 400). Bounded: at most
    ``MAX_HEADER_BYTES`` are held, for at most ``timeouts.client_header``."""

    __slots__ = ("server", "transport", "buf", "timer")

    def __init__(self, server: Proxy):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if not self.server.is_trusted(peer[0] if peer else None):
            self._hand_over(None, b"")
            return
        self.timer = asyncio.get_running_loop().call_later(
            self.server.config.timeouts.client_header, self._refuse, "no header in time"
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        result = proxy_protocol.parse(self.buf)
        if isinstance(result, proxy_protocol.NeedMore):
            return
        if isinstance(result, proxy_protocol.Invalid):
            self._refuse(result.reason)
            return
        source = result.source[0] if result.source is not None else None
        self._hand_over(source, self.buf[result.consumed :])

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _refuse(self, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.events.request_rejected(400)
        log.info("PROXY protocol: closing a connection from a trusted peer: %s", reason)
        if self.transport is not None:
            self.transport.abort()

    def _hand_over(self, source: str | None, rest: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
        transport = self.transport
        assert transport is not None
        client = ClientProtocol(self.server)
        transport.set_protocol(client)
        client.connection_made(transport)
        if source is not None and client.conn_state == OPEN:
            client.proxied(source)
        if rest and client.conn_state == OPEN:
            client.data_received(rest)
