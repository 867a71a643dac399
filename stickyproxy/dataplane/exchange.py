"""One request's journey: route, connect (or reuse), send, relay the response, retry.

States: PENDING → CONNECTING → SENT → RESPONDING → DONE. Retry rules (DESIGN.md P3):
- a connect that failed sent nothing: the request goes to the next usable backend on the
  key's preference list, whatever its method;
- a reset or timeout after the request was sent is retried only for an idempotent method
  without a request body (nothing streamed that could not be replayed), and only while no
  byte of the response reached the client; otherwise 502 (reset) or 504 (timeout);
- a failure after the response head reached the client aborts the client connection:
  a truncated body is never passed off as complete.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

from .http import HOP_BY_HOP, IDEMPOTENT_METHODS, NO_BODY_STATUSES, connection_tokens
from .tunnel import Tunnel
from .upstream import UpstreamProtocol

if TYPE_CHECKING:
    from ..router import BackendState, Router
    from .client import ClientProtocol

PENDING, CONNECTING, SENT, RESPONDING, DONE = range(5)

# A request body is buffered up to this many bytes while its connection is being set up;
# beyond it the client is not read until the body can flow (backpressure).
BODY_BUFFER_HIGH = 256 * 1024

# A response to a request whose body is still arriving finishes the exchange; the client
# connection is then closed, because the rest of the body can no longer be framed.

_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _chunk(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, _CRLF]


class Exchange:
    __slots__ = (
        "client", "server", "router", "method", "target", "version", "head", "framing",
        "content_length", "body_buf", "body_buffered", "body_seen", "body_sent", "body_done",
        "req_trailers", "upgrade", "key", "route", "owner", "backend", "tried", "attempts",
        "fresh_retry_used", "upstream", "reused", "state", "deadline", "deadline_kind",
        "status", "resp_reason", "resp_headers", "resp_framing", "resp_in_framing",
        "resp_bytes", "resp_trailers", "in_trailers", "started", "local", "local_close",
        "close_after", "error_kind", "retries", "head_only", "pending_101", "tunnel",
        "response_started_at", "upstream_keep_alive", "counted_inflight", "settled",
        "active_counted",
    )

    def __init__(self, client: ClientProtocol, method: str, target: bytes, version: str,
                 head: bytes, framing: str, content_length: int, upgrade: bool,
                 key: str | None):
        self.client = client
        self.server = client.server
        self.router: Router = client.server.router
        self.method = method
        self.target = target
        self.version = version
        self.head = head                  # request line + forwarded fields, no framing
        self.framing = framing            # "none" | "cl" | "chunked"
        self.content_length = content_length
        self.body_buf: list[bytes] = []
        self.body_buffered = 0
        self.body_seen = 0
        self.body_sent = 0
        self.body_done = framing == "none"
        self.req_trailers: list[tuple[bytes, bytes]] = []
        self.upgrade = upgrade
        self.key = key
        self.route = ""
        self.owner: str | None = None
        self.backend: BackendState | None = None
        self.tried: set[str] = set()
        self.attempts = 0
        self.fresh_retry_used = False
        self.upstream: UpstreamProtocol | None = None
        self.reused = False
        self.state = PENDING
        self.deadline = 0.0
        self.deadline_kind = ""
        self.status = 0
        self.resp_reason = b""
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.resp_framing = ""
        self.resp_in_framing = ""
        self.resp_bytes = 0
        self.resp_trailers: list[tuple[bytes, bytes]] = []
        self.in_trailers = False
        self.started = time.monotonic()
        self.response_started_at = 0.0
        self.local: tuple[int, str, bytes] | None = None
        self.local_close = False
        self.close_after = False
        self.error_kind = ""
        self.retries = 0
        self.head_only = method == "HEAD"
        self.pending_101 = False
        self.tunnel: Tunnel | None = None
        self.upstream_keep_alive = False
        self.counted_inflight = False
        self.settled = False
        self.active_counted = False

    # -- start ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Called when this exchange reaches the head of its connection's queue."""
        if self.local is not None:
            status, reason, extra = self.local
            self.client.respond_local(self, status, reason, close=self.local_close, extra=extra)
            return
        now = time.monotonic()
        self.server.active += 1
        self.active_counted = True
        router = self.router
        if self.key is not None:
            r = router.route(self.key, now)
        else:
            r = router.route_keyless(self.client.peer_ip, now)
        self.route = r.kind
        self.owner = r.owner
        if r.backend is None:
            self.route = "none"
            self.fail(503, "no backend available", retry_after=True)
            return
        self.try_backend(r.backend, now)

    def try_backend(self, backend: BackendState, now: float) -> None:
        self.attempts += 1
        self.backend = backend
        self.tried.add(backend.id)
        if not self.counted_inflight:
            backend.inflight += 1
            self.counted_inflight = True
        conn = backend.pool.acquire() if backend.pool is not None else None
        if conn is not None:
            self.attach(conn, reused=True)
            return
        self.open_connection(backend)

    def open_connection(self, backend: BackendState) -> None:
        self.state = CONNECTING
        self.deadline = 0.0  # the connect task bounds itself
        asyncio.get_running_loop().create_task(self._connect(backend))

    async def _connect(self, backend: BackendState) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.server.config.timeouts.connect
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamProtocol(backend, time.monotonic()),
                    backend.host, backend.port)
        except (OSError, TimeoutError) as e:
            kind = "timeout" if isinstance(e, TimeoutError) else "connect"
            if self.state == CONNECTING and self.backend is backend:
                self.on_connect_failed(backend, kind, e)
            return
        if backend.pool is not None:
            backend.pool.open += 1
        if self.state != CONNECTING or self.backend is not backend:
            # the client went away while we connected: keep the connection for others
            if backend.pool is not None:
                backend.pool.release(conn, time.monotonic())
            else:
                conn.close()
            return
        self.attach(conn, reused=False)

    def on_connect_failed(self, backend: BackendState, kind: str, exc: BaseException) -> None:
        events = self.server.events
        events.upstream_error(backend, "connect" if kind == "connect" else "timeout")
        events.connect_failed(backend, kind)
        self.next_backend(backend, "connect", f"backend {backend.id} unreachable", 502)

    def next_backend(self, failed: BackendState, reason: str, message: str, status: int) -> None:
        """Move to the next usable backend along the key's preference list, or fail."""
        now = time.monotonic()
        if self.attempts <= self.server.config.retries.attempts:
            for cand in self.router.alternatives(self.key, self.tried, now):
                if self.server.retry_allowed():
                    self._count_retry()
                    self.server.events.retry(failed, reason)
                    self._move_inflight(failed)
                    if self.route == "primary":
                        self.route = "failover"
                    self.try_backend(cand, now)
                    return
                break
        self.fail(status, message)

    def _count_retry(self) -> None:
        if not self.retries:
            self.server.retrying += 1
        self.retries += 1

    def _settle(self) -> None:
        """Give back the counters this exchange holds (in-flight, active, retrying); once."""
        if self.settled:
            return
        self.settled = True
        b = self.backend
        if b is not None and self.counted_inflight:
            b.inflight -= 1
            self.counted_inflight = False
        if self.retries:
            self.server.retrying -= 1
        if self.active_counted:
            self.server.active -= 1

    def _move_inflight(self, old: BackendState) -> None:
        if self.counted_inflight:
            old.inflight -= 1
            self.counted_inflight = False

    # -- send ----------------------------------------------------------------------------
    def attach(self, conn: UpstreamProtocol, reused: bool) -> None:
        self.upstream = conn
        self.reused = reused
        conn.exchange = self
        conn.requests += 1
        conn.head_only = self.head_only
        self.state = SENT
        b = self.backend
        hdr = self.server.config.headers
        route = "primary" if self.route in ("primary", "no_key") else self.route
        parts = [self.head,
                 self.server.backend_header(b.id),  # type: ignore[union-attr]
                 b"%s: %s\r\n" % (hdr.route.encode(), route.encode()) if self.key is not None else b""]
        if self.framing == "cl":
            parts.append(b"Content-Length: %d\r\n\r\n" % self.content_length)
        elif self.framing == "chunked":
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(_CRLF)
        for data in self.body_buf:
            self.body_sent += len(data)
            if self.framing == "chunked":
                parts += _chunk(data)
            else:
                parts.append(data)
        self.body_buf = []
        if self.body_buffered:
            self.body_buffered = 0
            self.client.resume_reading(self.client.PAUSE_BODY)
        if self.body_done and self.framing == "chunked":
            parts.append(self._last_chunk())
        conn.transport.writelines(parts)  # type: ignore[union-attr]
        self.deadline = time.monotonic() + self.server.config.timeouts.response
        self.deadline_kind = "response"

    def _last_chunk(self) -> bytes:
        if not self.req_trailers:
            return _LAST_CHUNK
        return b"0\r\n" + b"".join(b"%s: %s\r\n" % t for t in self.req_trailers) + _CRLF

    # -- request body (from the client) ---------------------------------------------------
    def on_request_body(self, data: bytes) -> None:
        self.body_seen += len(data)
        if self.state in (SENT, RESPONDING) and self.upstream is not None:
            self.body_sent += len(data)
            t = self.upstream.transport
            if self.framing == "chunked":
                t.writelines(_chunk(data))  # type: ignore[union-attr]
            else:
                t.write(data)  # type: ignore[union-attr]
            if self.deadline_kind == "response":
                self.deadline = time.monotonic() + self.server.config.timeouts.response
        elif self.state == DONE:
            return
        else:
            self.body_buf.append(data)
            self.body_buffered += len(data)
            if self.body_buffered > BODY_BUFFER_HIGH:
                self.client.pause_reading(self.client.PAUSE_BODY)

    def on_request_complete(self) -> None:
        self.body_done = True
        if self.framing == "chunked" and self.state in (SENT, RESPONDING) and self.upstream:
            self.upstream.transport.write(self._last_chunk())  # type: ignore[union-attr]

    def upstream_write_paused(self) -> None:
        if self.tunnel is not None:
            self.tunnel.upstream_write_paused()
        else:
            self.client.pause_reading(self.client.PAUSE_BACKPRESSURE)

    def upstream_write_resumed(self) -> None:
        if self.tunnel is not None:
            self.tunnel.upstream_write_resumed()
        else:
            self.client.resume_reading(self.client.PAUSE_BACKPRESSURE)

    # -- response (from the backend) ------------------------------------------------------
    def on_response_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            self.resp_trailers.append((name, value))
        else:
            self.resp_headers.append((name, value))

    def on_response_head(self, status: int, reason: bytes, keep_alive: bool) -> None:
        headers, self.resp_headers = self.resp_headers, []
        if status < 200:
            if status == 101:
                if self.upgrade:
                    self.status = 101
                    self.resp_reason = reason
                    self.resp_headers = headers
                    self.pending_101 = True
                    return
                self.on_upstream_failure(self.upstream, "protocol", "unrequested 101 response")
                return
            if self.version == "1.1":
                self.client.write(self.server.build_informational(status, reason, headers))
            return
        self.status = status
        self.upstream_keep_alive = keep_alive
        self.server.events.upstream_ok(self.backend, status)  # type: ignore[arg-type]
        no_body = self.head_only or status in NO_BODY_STATUSES
        cl = None
        chunked = False
        conn_tokens: set[bytes] = set()
        for n, v in headers:
            ln = n.lower()
            if ln == b"content-length":
                cl = v
            elif ln == b"transfer-encoding":
                chunked = v.strip().lower().endswith(b"chunked")
            elif ln == b"connection":
                conn_tokens |= connection_tokens([v])
        if no_body:
            self.resp_in_framing = "none"
        elif chunked:
            self.resp_in_framing = "chunked"
        elif cl is not None:
            self.resp_in_framing = "cl"
        else:
            self.resp_in_framing = "close"
        client = self.client
        close = client.must_close_after(self)
        if no_body:
            out_framing = "none"
        elif cl is not None and not chunked:
            out_framing = "cl"
        elif self.version == "1.1":
            out_framing = "chunked"
        else:
            out_framing = "close"
            close = True
        self.resp_framing = out_framing
        self.close_after = close
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or b"-")]
        drop = conn_tokens
        for n, v in headers:
            ln = n.lower()
            if ln in HOP_BY_HOP or ln in drop:
                if ln == b"content-length":
                    pass
                else:
                    continue
            if ln == b"content-length" and out_framing not in ("cl", "none"):
                continue
            parts.append(b"%s: %s\r\n" % (n, v))
        if out_framing == "chunked":
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
        elif self.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(_CRLF)
        self.state = RESPONDING
        self.response_started_at = time.monotonic()
        self.deadline = self.response_started_at + self.server.config.timeouts.body_idle
        self.deadline_kind = "body"
        client.transport.writelines(parts)  # type: ignore[union-attr]

    def on_response_body(self, data: bytes) -> None:
        self.resp_bytes += len(data)
        if self.resp_framing == "chunked":
            self.client.transport.writelines(_chunk(data))  # type: ignore[union-attr]
        else:
            self.client.transport.write(data)  # type: ignore[union-attr]
        self.deadline = time.monotonic() + self.server.config.timeouts.body_idle

    def on_response_complete(self, conn: UpstreamProtocol) -> bool | None:
        """The backend's response ended cleanly: whether ``conn`` may be reused, or None
        when that was an informational response and the final one follows."""
        if self.status < 200 or self.state != RESPONDING:
            return None
        if self.resp_framing == "chunked":
            if self.resp_trailers:
                trailers = [(n, v) for n, v in self.resp_trailers if n.lower() not in HOP_BY_HOP]
                self.client.transport.write(  # type: ignore[union-attr]
                    b"0\r\n" + b"".join(b"%s: %s\r\n" % t for t in trailers) + _CRLF)
            else:
                self.client.transport.write(_LAST_CHUNK)  # type: ignore[union-attr]
        reusable = (self.upstream_keep_alive and self.body_done
                    and self.resp_in_framing != "close")
        self.upstream = None
        self.finish()
        return reusable

    def on_upstream_upgrade(self, rest: bytes) -> None:
        """The backend switched protocols (101): from now on both sides are a tunnel."""
        conn = self.upstream
        if not self.pending_101 or conn is None:
            if conn is not None:
                self.on_upstream_failure(conn, "protocol", "unexpected upgrade")
                conn.close()
            return
        self.pending_101 = False
        parts = [b"HTTP/1.1 101 %s\r\n" % (self.resp_reason or b"Switching Protocols")]
        for n, v in self.resp_headers:
            parts.append(b"%s: %s\r\n" % (n, v))
        parts.append(_CRLF)
        self.resp_headers = []
        self.state = RESPONDING
        self.deadline = 0.0
        client = self.client
        client.transport.writelines(parts)  # type: ignore[union-attr]
        backend = self.backend
        self.tunnel = Tunnel(client, conn, backend, self.server.tunnel_closed)  # type: ignore[arg-type]
        self.server.events.tunnel_opened(backend)  # type: ignore[arg-type]
        if rest:
            self.tunnel.from_upstream(rest)
        # the request is answered; the tunnel (counted separately) owns both connections
        self.state = DONE
        self._settle()
        self.server.events.request_done(self)
        client.start_tunnel(self.tunnel)

    def on_upstream_failure(self, conn: UpstreamProtocol | None, kind: str, message: str) -> None:
        """The connection for this exchange failed (reset, timeout or malformed reply)."""
        if self.state == DONE or (conn is not None and conn is not self.upstream):
            return
        if conn is not None:
            conn.exchange = None
            conn.abort()
        self.upstream = None
        backend = self.backend
        self.server.events.upstream_error(backend, kind)  # type: ignore[arg-type]
        if self.state == RESPONDING:
            # part of the response reached the client: never pass off a truncated body
            self.error_kind = kind
            self.finish(abort_client=True)
            return
        timeout = kind == "timeout"
        status = 504 if timeout else 502
        msg = (f"backend {backend.id} did not answer in time" if timeout  # type: ignore[union-attr]
               else f"backend {backend.id} failed: {message}")  # type: ignore[union-attr]
        if not self.replayable():
            self.fail(status, msg)
            return
        if (self.reused and kind == "reset" and not self.fresh_retry_used):
            # a pooled connection the backend had just closed: same backend, new connection
            self.fresh_retry_used = True
            self._count_retry()
            self.server.events.retry(backend, "stale-connection")  # type: ignore[arg-type]
            self.open_connection(backend)  # type: ignore[arg-type]
            return
        self.next_backend(backend, kind, msg, status)  # type: ignore[arg-type]

    def replayable(self) -> bool:
        """Safe to send again: idempotent, no body streamed, nothing sent to the client."""
        return (self.method in IDEMPOTENT_METHODS and self.framing == "none"
                and self.state in (CONNECTING, SENT) and not self.upgrade)

    def on_upstream_lost(self, conn: UpstreamProtocol, exc: BaseException | None) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            return
        if self.state == RESPONDING and self.resp_in_framing == "close" and exc is None:
            # a close-delimited response ends with the connection (RFC 9112 §6.3 item 8)
            if self.resp_framing == "chunked":
                self.client.transport.write(_LAST_CHUNK)  # type: ignore[union-attr]
            self.upstream = None
            self.finish()
            return
        if self.state in (SENT, RESPONDING):
            self.upstream = conn
            self.on_upstream_failure(conn, "reset", "connection closed before the response ended")

    def on_deadline(self, now: float) -> None:
        if self.deadline_kind == "response" and self.state == SENT:
            self.on_upstream_failure(self.upstream, "timeout", "no response in time")
        elif self.deadline_kind == "body" and self.state == RESPONDING:
            self.on_upstream_failure(self.upstream, "timeout", "response body stalled")

    # -- end -----------------------------------------------------------------------------
    def fail(self, status: int, reason: str, retry_after: bool = False) -> None:
        """Answer the client with a proxy-made error (nothing of a response was sent)."""
        self.status = status
        self.error_kind = self.error_kind or "proxy"
        extra = b"Retry-After: 1\r\n" if retry_after else b""
        self.client.respond_local(self, status, reason, close=not self.body_done, extra=extra)

    def finish(self, abort_client: bool = False) -> None:
        if self.state == DONE:
            return
        self.state = DONE
        self.deadline = 0.0
        self._settle()
        if self.upstream is not None:
            conn, self.upstream = self.upstream, None
            conn.exchange = None
            conn.abort()
        if not self.body_done:
            self.close_after = True
        self.server.events.request_done(self)
        self.client.exchange_done(self, abort=abort_client)

    def abort(self) -> None:
        """The client went away: release everything without answering."""
        if self.state == DONE:
            return
        if self.tunnel is not None:
            self.tunnel.close()
        self.error_kind = self.error_kind or "client-closed"
        self.state = DONE
        self.deadline = 0.0
        self._settle()
        if self.upstream is not None and self.tunnel is None:
            conn, self.upstream = self.upstream, None
            conn.exchange = None
            conn.abort()
        self.server.events.request_done(self)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
