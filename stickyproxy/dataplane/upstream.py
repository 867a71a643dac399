"""Connections to backends: the response-parsing protocol, and ``Upstream``, the one object
per backend that decides its in-flight slots, waiters and keep-alive connections.

Invariants:
- A connection serves one exchange at a time (no upstream pipelining).
- It goes back to its pool only after its response was parsed completely and cleanly, the
  request was sent completely, and both sides allow keep-alive; anything else closes it.
- Bytes that arrive on an idle pooled connection mean the backend is out of step with us:
  the connection is closed, never handed to the next request.

A connection's flags are not one lifecycle in disguise. ``closed`` is its whole life (open,
then closing or closed for good: two states, one flag). ``paused`` (reading held back for a
client that does not keep up) and ``head_only`` (the request is HEAD) hold independently
at any point of it. ``finished``, ``head_done`` and ``garbage`` describe the read being
parsed, and are acted on once it has been: a response ended in it (RESPONSE_REUSABLE or
RESPONSE_CLOSE), that response was a HEAD one's (the parser is replaced), bytes followed it
(the connection is not reused).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from .http import FIELD_CACHE_SIZE, HOP_BY_HOP

# Response fields the proxy handles itself: hop-by-hop ones are dropped, framing ones are
# re-made for the client's hop.
RESPONSE_WATCH: Final = HOP_BY_HOP | {b"content-length"}

# Response field spellings seen → (lower-cased name, whether RESPONSE_WATCH has it,
# ``name + b": "``); bounded like the request side's (http.FIELD_CACHE_SIZE).
_response_fields: dict[bytes, tuple[bytes, bool, bytes]] = {}


def response_field(name: bytes) -> tuple[bytes, bool, bytes]:
    info = _response_fields.get(name)
    if info is None:
        ln = name.lower()
        info = (ln, ln in RESPONSE_WATCH, name + b": ")
        if len(_response_fields) >= FIELD_CACHE_SIZE:
            _response_fields.clear()
        _response_fields[name] = info
    return info


# UpstreamProtocol.finished: a response ended during the read being parsed (0: none did).
RESPONSE_REUSABLE: Final = 1  # cleanly, and both sides allow keep-alive
RESPONSE_CLOSE: Final = 2  # the connection may not carry another request


if TYPE_CHECKING:
    from ..control.metrics import Tally
    from ..routing.router import BackendState
    from .exchange import Exchange
    from .h2upstream import H2Pool
    from .tunnel import Tunnel


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "backend",
        "transport",
        "parser",
        "exchange",
        "requests",
        "idle_since",
        "closed",
        "paused",
        "head_only",
        "head_done",
        "finished",
        "garbage",
        "created",
        "reason",
    )

    def __init__(self, backend: Upstream, now: float):
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        # typed, not Any: compiled, every access to the exchange is then a native one
        self.exchange: Exchange | None = None
        self.requests = 0
        self.idle_since = now
        self.created = now
        self.closed = False
        self.paused = False
        self.head_only = False  # the current request is HEAD: its response has no body
        self.head_done = False  # ... and its head has been relayed
        self.finished = 0  # set during a read: RESPONSE_REUSABLE or RESPONSE_CLOSE
        self.garbage = False  # bytes beyond the end of the current response
        self.reason = b""

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()
            return
        if ex.tunnel is not None:
            ex.tunnel.from_upstream(data)
            return
        client = ex.client
        client.batch += 1
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            ex = self.exchange
            if ex is not None:
                ex.on_upstream_upgrade(data[e.args[0] :])
            return
        except HttpParserError as e:
            ex = self.exchange
            if self.finished or self.head_done:
                self.garbage = True
            elif ex is not None and ex.status == 0 and _later_minor_version(data):
                # RFC 9110 §2.5: a later HTTP/1 minor version is processed as 1.1 (llhttp
                # refuses it); the status line is this read's first bytes, rewritten in place
                self.parser = HttpResponseParser(self)
                self.data_received(b"HTTP/1.1" + data[8:])
                return
            elif ex is not None:
                ex.on_upstream_failure(self, "protocol", f"malformed response: {e}")
            self.close()
        finally:
            client.batch -= 1
            if not client.batch and client.out:
                client.flush()
        if self.head_done:
            self.head_done = False
            self.parser = HttpResponseParser(self)
        if self.finished:
            # The pool gets the connection back only after the whole read was parsed, so a
            # byte past the end of a response can never be read as the next one's.
            reusable = self.finished == RESPONSE_REUSABLE and not self.garbage and not self.closed
            self.finished = 0
            if reusable:
                self.backend.release(self, time.monotonic())
            else:
                self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.backend.lost(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.on_upstream_lost(self, exc)

    def detach(self, *, abort: bool) -> None:
        """Belong to no exchange any more and close: at once (``abort``: its message
        boundaries are not known to be complete, so it is never reused, P6) or after what
        was written is flushed (a finished tunnel)."""
        self.exchange = None
        if abort:
            self.abort()
        else:
            self.close()

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_write_paused()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_write_resumed()

    # -- llhttp callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.finished or self.head_done or self.exchange is None:
            self.garbage = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Collects the response head straight into the exchange (one call per field):
        # hop-by-hop fields are dropped (RFC 9110 §7.6.1), framing ones kept aside.
        ex = self.exchange
        if ex is None or self.head_done:
            self.garbage = True
            return
        if ex.in_trailers:
            ex.add_trailer(name, value)
            return
        ln, watched, lead = response_field(name)
        if watched:
            if ln == b"content-length":
                ex.resp_cl = value
            elif ln == b"connection":
                if ex.resp_conn is None:
                    ex.resp_conn = [value]
                else:
                    ex.resp_conn.append(value)
            elif ln == b"transfer-encoding":
                ex.resp_te = value if ex.resp_te is None else ex.resp_te + b", " + value
            elif ln == b"upgrade":
                ex.resp_upgrade = value
            return
        ex.resp_out.append(lead + value + b"\r\n")

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None or self.head_done:
            self.garbage = True
            return
        reason, self.reason = self.reason, b""
        status = self.parser.get_status_code()
        ex.on_response_head(status, reason, self.parser.should_keep_alive())
        if self.head_only and status >= 200 and self.exchange is ex:
            # llhttp cannot know a HEAD response has no body: it ends here, and the
            # connection gets a fresh parser once this read is processed.
            self.head_done = True
            self.exchange = None
            self.finished = RESPONSE_REUSABLE if ex.on_response_complete(self) else RESPONSE_CLOSE

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is None or self.head_done:
            self.garbage = True
            return
        ex.on_response_body(body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is None or self.head_done:
            return
        done = ex.on_response_complete(self)
        if done is not None:
            self.exchange = None
            self.finished = RESPONSE_REUSABLE if done else RESPONSE_CLOSE

    # -- control -------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _later_minor_version(data: bytes) -> bool:
    """``data`` starts with a status line of HTTP/1.2 to HTTP/1.9."""
    return data[:7] == b"HTTP/1." and len(data) > 8 and 0x32 <= data[7] <= 0x39 and data[8] == 0x20


class Upstream:
    """The data plane's side of one backend (httpcore's connection pool is the model): its
    in-flight count and the exchanges waiting for a slot, its idle keep-alive connections
    (most recently used last) and how many connections are open, its WebSocket tunnels.
    Exchanges ask it (``acquire``/``release``/``connected``/``lost``, ``hold``/``free``)
    and do the I/O themselves. Routing's view of the backend is ``state``."""

    __slots__ = (
        "state",
        "id",
        "host",
        "port",
        "max_idle",
        "max_requests",
        "idle_timeout",
        "idle",
        "open",
        "inflight",
        "waiters",
        "tunnels",
        "tally",
        "ssl",
        "server_hostname",
        "h2pool",
    )

    def __init__(self, state: BackendState, max_idle: int, max_requests: int, idle_timeout: float):
        self.state = state
        self.id = state.id
        self.host = state.host
        self.port = state.port
        self.max_idle = max_idle
        self.max_requests = max_requests
        self.idle_timeout = idle_timeout
        self.idle: deque[UpstreamProtocol] = deque()
        self.open = 0
        self.inflight = 0
        self.waiters: deque[Exchange] = deque()  # exchanges waiting for an in-flight slot
        self.tunnels: set[Tunnel] = set()
        self.tally: Tally | None = None  # request counts, set by the Observer
        # an https:// backend: the context and the name sent by SNI and verified
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        # a protocol = "h2" backend: its HTTP/2 connections (h2upstream.py), whose streams
        # stand in for this pool's connections; None for HTTP/1.1
        self.h2pool: H2Pool | None = None

    # -- in-flight slots ---------------------------------------------------------------
    def has_slot(self, cap: int) -> bool:
        """``cap``: limits.max_inflight_per_backend (0: unlimited)."""
        return not cap or self.inflight < cap

    def hold(self) -> None:
        self.inflight += 1

    def free(self) -> None:
        self.inflight -= 1

    # -- connections -------------------------------------------------------------------
    def connected(self) -> None:
        self.open += 1

    def lost(self, conn: UpstreamProtocol) -> None:
        if self.h2pool is not None:
            return  # an HTTP/2 stream: its connection is counted by the H2Pool
        self.discard(conn)
        self.open -= 1

    def configure(self, max_idle: int, max_requests: int, idle_timeout: float) -> None:
        self.max_idle, self.max_requests, self.idle_timeout = max_idle, max_requests, idle_timeout
        if self.h2pool is not None:
            self.h2pool.configure(max_requests, idle_timeout)
        while len(self.idle) > self.max_idle:
            self.idle.popleft().close()

    def acquire(self) -> UpstreamProtocol | None:
        if self.h2pool is not None:
            return self.h2pool.acquire()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
        return None

    def release(self, conn: UpstreamProtocol, now: float) -> None:
        conn.exchange = None
        if self.h2pool is not None:
            conn.close()  # its stream is done; the next request opens another
            return
        if conn.closed or conn.requests >= self.max_requests or len(self.idle) >= self.max_idle:
            conn.close()
            return
        if conn.paused:
            conn.resume_reading()  # an idle connection must see the backend's close
        conn.idle_since = now
        self.idle.append(conn)

    def discard(self, conn: UpstreamProtocol) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, now: float) -> None:
        """Close connections idle longer than the idle timeout (oldest are at the left)."""
        if self.h2pool is not None:
            self.h2pool.sweep(now)
        idle = self.idle
        while idle and now - idle[0].idle_since > self.idle_timeout:
            idle.popleft().close()

    def close_all(self) -> None:
        if self.h2pool is not None:
            self.h2pool.close_all()
        while self.idle:
            self.idle.pop().close()

    def close_tunnels(self) -> int:
        n = len(self.tunnels)
        for tunnel in list(self.tunnels):
            tunnel.close()
        return n
