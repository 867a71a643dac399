"""One request's journey: route, connect (or reuse), send, relay the response, retry.

States: PENDING → CONNECTING → SENT → RESPONDING → DONE. Retry rules (DESIGN.md P3;
which failure goes where, and which ones the retry budget limits: dataplane/retry.py):
- a connect that failed sent nothing: the request goes to the next usable backend on the
  key's preference list, whatever its method;
- a reset or timeout after the request was sent is retried only for an idempotent method
  without a request body (nothing streamed that could not be replayed), and only while no
  byte of the response reached the client; otherwise 502 (reset) or 504 (timeout);
- a failure after the response head reached the client aborts the client connection:
  a truncated body is never passed off as complete.

Counters: every shared counter an exchange adds to (its backend's in-flight slots,
``Proxy.active``, ``Proxy.retrying``) is given back exactly once. ``Exchange.held`` has one
bit per counter (HELD_*): set where it is added to, cleared where it is given back, and
nothing is given back whose bit is clear. A retry that moves to another backend frees its
slot (``_release_slot``); ``_settle``, as the exchange becomes DONE (nothing is taken after
that), gives back whatever is still held, whichever of the paths that end an exchange
calls it and however often.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING, Final

from ..routing.spill import choose, within
from ..tls import describe_verify_error
from .h2upstream import UpstreamGone
from .http import HOP_BY_HOP, IDEMPOTENT_METHODS, NO_BODY_STATUSES, connection_tokens, without_named
from .retry import (
    CONNECT_REFUSED,
    CONNECT_TIMEOUT,
    NO_RETRY,
    RESET,
    SAME_BACKEND,
    TLS,
    decide,
    retry_reason,
)
from .tunnel import Tunnel
from .upstream import Upstream, UpstreamProtocol

if TYPE_CHECKING:
    from ..routing.router import BackendState, Router
    from .client import ClientProtocol

# Exchange states, in the order an exchange normally passes them (QUEUED: waiting for an
# in-flight slot on a backend at its cap).
PENDING: Final = 0
CONNECTING: Final = 1
SENT: Final = 2
RESPONDING: Final = 3
DONE: Final = 4
QUEUED: Final = 5

# Bits of Exchange.held, one per counter the exchange adds to (module docstring):
HELD_SLOT: Final = 1  # an in-flight slot of ``slot``'s backend (Upstream.hold/free)
HELD_ACTIVE: Final = 2  # one of Proxy.active, the requests being worked on
HELD_RETRY: Final = 4  # one of Proxy.retrying, the retry budget's count


# A slow request body is judged against limits.min_body_rate only after this long
# (seconds), and the rate is checked this often.
BODY_RATE_GRACE: Final = 2.0
BODY_RATE_CHECK: Final = 1.0

# A request body is buffered up to this many bytes while its connection is being set up;
# beyond it the client is not read until the body can flow (backpressure).
BODY_BUFFER_HIGH: Final = 256 * 1024

# A response to a request whose body is still arriving finishes the exchange; the client
# connection is then closed, because the rest of the body can no longer be framed.

_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


# Connection values that name no other field (the usual ones): nothing more to remove.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"upgrade"})


def _chunk(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, _CRLF]


class Exchange:
    """Plain attributes with class-level defaults: an exchange sets only what it uses, which
    keeps creating one (once per request) cheap."""

    # request
    framing = "none"  # "none" | "cl" | "chunked"
    content_length = 0
    body_buf: list[bytes] | None = None
    body_buffered = 0
    body_seen = 0
    req_trailers: list[bytes] | None = None
    upgrade = False
    body_started = 0.0
    last_body_at = 0.0
    key: str | None = None
    route_key: str | None = None  # the ring key of a keyless request routed by client IP
    close_after = False  # the client connection closes after this response
    local: tuple[int, str, bytes] | None = None
    local_close = False
    # routing
    route = ""
    owner: str | None = None
    spilled_from: str | None = None  # bounded load moved this request off that backend
    backend: BackendState | None = None
    slot: Upstream | None = None  # the data plane's side of ``backend``
    tried: tuple[str, ...] = ()
    attempts = 0
    retries = 0
    held = 0  # HELD_* bits: the counters this exchange adds to, until given back
    same_tried = False  # a new connection to the failed backend was tried
    # upstream
    reused = False
    upstream: UpstreamProtocol | None = None
    state = PENDING
    deadline = 0.0
    deadline_kind = ""
    # response
    status = 0
    resp_reason = b""
    resp_cl: bytes | None = None
    resp_te: bytes | None = None
    resp_conn: list[bytes] | None = None
    resp_upgrade = b""
    resp_framing = ""  # towards the client: "none" | "cl" | "chunked" | "close"
    resp_in_framing = ""  # from the backend: "none" | "cl" | "chunked" | "close"
    resp_bytes = 0
    resp_trailers: list[tuple[bytes, bytes]] | None = None
    in_trailers = False
    upstream_keep_alive = False
    pending_101 = False
    tunnel: Tunnel | None = None
    error_kind = ""

    def __init__(
        self,
        client: ClientProtocol,
        method: str,
        target: bytes,
        version: str,
        head: bytes,
        framing: str = "none",
        content_length: int = 0,
        upgrade: bool = False,
        key: str | None = None,
    ):
        self.client = client
        server = self.server = client.server
        self.router: Router = server.router
        self.method = method
        self.target = target
        self.version = version
        self.head = head  # request line + forwarded fields, no framing
        if framing != "none":
            self.framing = framing
            self.content_length = content_length
            self.body_done = framing == "cl" and content_length == 0
        else:
            self.body_done = True
        if upgrade:
            self.upgrade = True
        self.key = key
        self.head_only = method == "HEAD"
        self.resp_out: list[bytes] = []
        self.started = time.monotonic()

    # -- start ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Called when this exchange reaches the head of its connection's queue."""
        if self.local is not None:
            status, reason, extra = self.local
            self.client.respond_local(self, status, reason, close=self.local_close, extra=extra)
            return
        now = time.monotonic()
        self.server.active += 1
        self.held |= HELD_ACTIVE
        router = self.router
        key = self.key
        if key is not None:
            r = router.route(key, now)
            if router.hotkeys is not None:
                router.count_key(key, now)
        else:
            # route_key: the client's address under no_key = "client-ip" (retries then
            # follow that address's ring order), else None (round-robin)
            r = router.route_keyless(self.route_key, now)
        self.route = r.kind
        self.owner = r.owner
        backend = r.backend
        if backend is None:
            self.route = "none"
            self.fail(503, "no backend available", retry_after=True)
            return
        pct = router.balance_pct
        if pct and key is not None and (r.kind == "primary" or r.kind == "failover"):
            backend = self.bounded(key, backend, now, pct)
        self.try_backend(backend, now)

    def bounded(self, key: str, first: BackendState, now: float, pct: int) -> BackendState:
        """Bounded load (routing/spill.py): ``first`` unless it is above ``pct`` % of the
        mean in-flight load of the backends ``key`` may use; then the first of them along
        the key's preference list that is within it (route "spill")."""
        server = self.server
        cands = self.router.spill_order(key, first, now)
        loads = [server.upstream_for(c).inflight for c in cands]
        weights = [c.weight for c in cands]
        total = sum(loads)
        total_weight = sum(weights)
        if within(loads[0], weights[0], total, total_weight, pct):
            return first
        i = choose(loads, weights, total, total_weight, pct)
        if i <= 0:
            return first
        self.spilled_from = first.id
        self.route = "spill"
        return cands[i]

    def try_backend(self, backend: BackendState, now: float) -> None:
        self.attempts += 1
        self.backend = backend
        slot = self.slot = self.server.upstream_for(backend)
        self.tried += (backend.id,)
        self.take_slot(slot, now)

    def take_slot(self, slot: Upstream, now: float) -> None:
        """Count this exchange in flight on ``slot``'s backend and send, or wait for a slot
        when it is at ``limits.max_inflight_per_backend`` (503 past the queue bound)."""
        if not self.held & HELD_SLOT:
            if not slot.has_slot(self.server.max_inflight):
                if len(slot.waiters) >= self.server.config.limits.queue_per_backend:
                    self.fail(503, f"backend {slot.id} is at capacity", retry_after=True)
                    return
                slot.waiters.append(self)
                self.state = QUEUED
                self.deadline = now + self.server.config.timeouts.queue
                self.deadline_kind = "queue"
                return
            slot.hold()
            self.held |= HELD_SLOT
        conn = slot.acquire()
        if conn is not None:
            self.attach(conn, reused=True)
            return
        self.open_connection(slot)

    def open_connection(self, slot: Upstream) -> None:
        self.state = CONNECTING
        self.deadline = 0.0  # the connect task bounds itself
        asyncio.get_running_loop().create_task(self._connect(slot))

    async def _connect(self, slot: Upstream) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.server.config.timeouts.connect
        try:
            async with asyncio.timeout(timeout):
                # names are resolved by the proxy's cache (discovery/resolver.py), never by
                # a blocking lookup per connection; a failed lookup is an OSError
                resolver = self.server.resolver
                if slot.h2pool is not None:
                    # HTTP/2: a stream, on a new connection only if none has room
                    conn = await slot.h2pool.connect(resolver)
                else:
                    addrs = resolver.cached(slot.host) or await resolver.resolve(slot.host)
                    _, conn = await loop.create_connection(
                        lambda: UpstreamProtocol(slot, time.monotonic()),
                        addrs[0],
                        slot.port,
                        ssl=slot.ssl,
                        server_hostname=slot.server_hostname,
                    )
                    slot.connected()
        except ssl.SSLError as e:  # an OSError too: the backend answered, its TLS failed
            if self.state == CONNECTING and self.slot is slot:
                self.on_connect_failed(slot, TLS, e)
            return
        except (OSError, TimeoutError) as e:
            kind = "timeout" if isinstance(e, TimeoutError) else "connect"
            if self.state == CONNECTING and self.slot is slot:
                self.on_connect_failed(slot, kind, e)
            return
        if self.state != CONNECTING or self.slot is not slot:
            # the client went away while we connected: keep the connection for others
            slot.release(conn, time.monotonic())
            return
        self.attach(conn, reused=False)

    def on_connect_failed(self, slot: Upstream, kind: str, exc: BaseException) -> None:
        """``kind``: "connect" (refused, or no address), "timeout" or "tls" (the handshake
        failed: a certificate not trusted, expired or for another name, or no TLS there)."""
        events = self.server.events
        refused = kind == "connect"
        backend = slot.state
        events.upstream_error(backend, kind)
        if kind == TLS:
            # Nothing was sent: safe to try the next backend. But the host answered: it is
            # not a dead host (its pool is kept) nor one to skip (no connect_down), so a
            # last 502 keeps its reason: what was wrong with the certificate.
            self.retry(backend, TLS, f"backend {backend.id}: {describe_verify_error(exc)}", 502)
            return
        events.connect_failed(backend, kind)
        if refused:
            moved = refused_backend(slot)
            self.retry(backend, CONNECT_REFUSED, f"backend {backend.id} unreachable", 502)
            for ex in moved:
                ex.retry(backend, CONNECT_REFUSED, f"backend {backend.id} unreachable", 502)
        else:
            self.retry(backend, CONNECT_TIMEOUT, f"backend {backend.id} unreachable", 502)

    def retry(self, failed: BackendState, kind: str, message: str, status: int) -> None:
        """After an attempt on ``failed`` failed (``kind``: see dataplane/retry.py) with
        nothing sent to the client: try again as ``retry.decide`` says, or answer
        ``status`` with ``message``. A retry not made is counted with its reason."""
        now = time.monotonic()
        events = self.server.events
        action, budgeted = decide(
            kind, self.replayable(), self.reused, self.same_tried, failed.usable(now)
        )
        if action == NO_RETRY:
            events.retry_denied(failed, "not-replayable")
            self.fail(status, message)
            return
        if budgeted and not self.held & HELD_RETRY:
            if not self.server.retry_allowed():
                events.retry_denied(failed, "budget")
                self.fail(status, message)
                return
            self.held |= HELD_RETRY
            self.server.retrying += 1
        if action == SAME_BACKEND:
            self.same_tried = True
            self.retries += 1
            events.retry(failed, retry_reason(kind, action))
            self.open_connection(self.slot)  # type: ignore[arg-type]
            return
        if self.attempts <= self.server.config.retries.attempts:
            for cand in self.router.alternatives(self.route_key or self.key, self.tried, now):
                self.retries += 1
                self.same_tried = False
                events.retry(failed, retry_reason(kind, action))
                self._release_slot()
                if self.route == "primary":
                    self.route = "failover"
                self.try_backend(cand, now)
                return
            denied = "no-backend"
        else:
            denied = "attempts"
        events.retry_denied(failed, denied)
        if not any(b.usable(now) for b in self.router.ordered):
            self.fail(503, "no backend available", retry_after=True)
            return
        self.fail(status, message)

    def leave_queue(self) -> None:
        b = self.slot
        if self.state == QUEUED and b is not None:
            try:
                b.waiters.remove(self)
            except ValueError:
                pass

    def _settle(self) -> None:
        """Give back every counter still held (``held``; module docstring). Called as the
        exchange becomes DONE; a second call finds nothing held."""
        held = self.held
        if not held:
            return
        # cleared first: giving back a slot starts a waiting exchange, which may end others
        self.held = 0
        if held & HELD_SLOT:
            self._free_slot()
        if held & HELD_RETRY:
            self.server.retrying -= 1
        if held & HELD_ACTIVE:
            self.server.active -= 1

    def _release_slot(self) -> None:
        """Stop counting in flight on the current backend, if this exchange does."""
        if self.held & HELD_SLOT:
            self.held &= ~HELD_SLOT
            self._free_slot()

    def _free_slot(self) -> None:
        """The slot on ``slot``'s backend is free (its HELD_SLOT bit already cleared): the
        longest waiter there may take it."""
        b = self.slot
        if b is not None:
            b.free()
            if b.waiters:
                wake_waiter(b)

    # -- send ----------------------------------------------------------------------------
    def attach(self, conn: UpstreamProtocol, reused: bool) -> None:
        self.upstream = conn
        self.reused = reused
        conn.exchange = self
        conn.requests += 1
        conn.head_only = self.head_only
        self.state = SENT
        server = self.server
        parts = [self.head, server.backend_headers[self.backend.id]]  # type: ignore[union-attr]
        if self.key is not None:
            parts.append(server.route_headers[self.backend.id == self.owner])  # type: ignore[union-attr]
        framing = self.framing
        if framing == "none":
            parts.append(_CRLF)
        else:
            if framing == "cl":
                parts.append(b"Content-Length: %d\r\n\r\n" % self.content_length)
            else:
                parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
            if self.body_buf:
                for data in self.body_buf:
                    if framing == "chunked":
                        parts += _chunk(data)
                    else:
                        parts.append(data)
                self.body_buf = None
                if self.body_buffered:
                    self.body_buffered = 0
                    self.client.resume_reading(self.client.PAUSE_BODY)
            if self.body_done and framing == "chunked":
                parts.append(self._last_chunk())
        conn.transport.write(b"".join(parts))  # type: ignore[union-attr]
        if self.client.write_paused:
            conn.pause_reading()  # the client is not keeping up: hold the response back
        now = time.monotonic()
        if self.body_done:
            self.deadline = now + server.response_timeout
            self.deadline_kind = "response"
        else:
            self.body_started = self.body_started or now
            self._request_body_deadline(now)

    def _last_chunk(self) -> bytes:
        if not self.req_trailers:
            return _LAST_CHUNK
        # trailer fields travel as received, minus framing and hop-by-hop ones
        return b"0\r\n" + b"".join(self.req_trailers) + _CRLF

    # -- request body (from the client) ---------------------------------------------------
    def on_request_body(self, data: bytes) -> None:
        self.body_seen += len(data)
        if self.state in (SENT, RESPONDING) and self.upstream is not None:
            t = self.upstream.transport
            if self.framing == "chunked":
                t.writelines(_chunk(data))  # type: ignore[union-attr]
            else:
                t.write(data)  # type: ignore[union-attr]
            if self.deadline_kind == "request-body":
                self.last_body_at = time.monotonic()
        elif self.state == DONE:
            return
        else:
            if self.body_buf is None:
                self.body_buf = []
            self.body_buf.append(data)
            self.body_buffered += len(data)
            if self.body_buffered > BODY_BUFFER_HIGH:
                self.client.pause_reading(self.client.PAUSE_BODY)

    def _request_body_deadline(self, now: float) -> None:
        """While the client sends the body, the clock is the client's: ``body_idle``
        without a byte (and ``limits.min_body_rate`` if set) ends it with 408."""
        self.last_body_at = self.last_body_at or now
        self.deadline = now + min(self.server.config.timeouts.body_idle, BODY_RATE_CHECK)
        self.deadline_kind = "request-body"

    def _request_body_stalled(self, now: float) -> str | None:
        cfg = self.server.config
        if now - self.last_body_at > cfg.timeouts.body_idle:
            return "request body not received in time"
        rate = cfg.limits.min_body_rate
        elapsed = now - self.body_started
        if rate and elapsed > BODY_RATE_GRACE and self.body_seen < rate * elapsed:
            return f"request body slower than {rate} bytes/s"
        return None

    def on_request_complete(self) -> None:
        self.body_done = True
        if self.deadline_kind == "request-body" and self.state == SENT:
            self.deadline = time.monotonic() + self.server.response_timeout
            self.deadline_kind = "response"
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
    def add_trailer(self, name: bytes, value: bytes) -> None:
        if self.resp_trailers is None:
            self.resp_trailers = []
        self.resp_trailers.append((name, value))

    def _reset_response_head(self) -> list[bytes]:
        out = self.resp_out
        self.resp_out = []
        self.resp_cl = self.resp_te = self.resp_conn = None
        return out

    def on_response_head(self, status: int, reason: bytes, keep_alive: bool) -> None:
        if status < 200 or status > 599:
            if status < 100 or status > 599:
                # RFC 9110 §15: every valid status code is within 100..599 (a "099" would
                # be relayed as the two digits "99")
                self.on_upstream_failure(self.upstream, "protocol", "invalid status code")
                return
            self._informational(status, reason)
            return
        self.status = status
        self.in_trailers = True
        self.upstream_keep_alive = keep_alive
        self.server.events.upstream_ok(self.backend, status)  # type: ignore[arg-type]
        cl = self.resp_cl
        te = self.resp_te
        te_line = b"Transfer-Encoding: chunked\r\n"
        conn_values = self.resp_conn
        out = self.resp_out
        if conn_values is not None and not (
            len(conn_values) == 1 and conn_values[0].lower() in _PLAIN_CONNECTION
        ):
            out = without_named(out, connection_tokens(conn_values))
        if self.head_only or status in NO_BODY_STATUSES:
            self.resp_in_framing = out_framing = "none"
        elif te is not None:
            codings = [c.strip().lower() for c in te.split(b",") if c.strip()]
            chunked_last = codings[-1:] == [b"chunked"]
            other = codings[:-1] if chunked_last else codings
            if b"chunked" in other:
                # RFC 9112 §6.1: chunked is applied at most once, and last; a body coded
                # otherwise has no length anyone can agree on
                self.on_upstream_failure(
                    self.upstream, "protocol", "chunked transfer coding applied twice or not last"
                )
                return
            self.resp_in_framing = "chunked" if chunked_last else "close"
            if other:
                # other transfer codings (gzip, ...) travel on in the order they were
                # applied, re-chunked for this hop (RFC 9112 §6.1, §7); an HTTP/1.0 client
                # cannot receive any transfer coding
                if self.version != "1.1":
                    self.cannot_relay("a transfer-coded response cannot reach an HTTP/1.0 client")
                    return
                te_line = b"Transfer-Encoding: " + b", ".join(other) + b", chunked\r\n"
                out_framing = "chunked"
            else:
                out_framing = "chunked" if self.version == "1.1" else "close"
        elif cl is not None:
            self.resp_in_framing = out_framing = "cl"
        else:
            self.resp_in_framing = "close"
            out_framing = "chunked" if self.version == "1.1" else "close"
        client = self.client
        # a response that starts before the request body ended leaves the rest of that body
        # unread: the connection cannot carry another request, and the head says so
        close = (
            self.close_after
            or out_framing == "close"
            or not self.body_done
            or client.must_close_after(self)
        )
        self.resp_framing = out_framing
        self.close_after = close
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason or b"-")]
        head += out
        if cl is not None and (out_framing == "cl" or out_framing == "none" and status != 204):
            head.append(b"Content-Length: " + cl + _CRLF)
        elif out_framing == "chunked":
            head.append(te_line)
        if close:
            head.append(b"Connection: close\r\n\r\n")
        elif self.version == "1.0":
            head.append(b"Connection: keep-alive\r\n\r\n")
        else:
            head.append(_CRLF)
        self.state = RESPONDING
        self.deadline = time.monotonic() + self.server.body_idle
        self.deadline_kind = "body"
        client.writelines(head)

    def _informational(self, status: int, reason: bytes) -> None:
        upgrade = self.resp_upgrade
        out = self._reset_response_head()
        if status == 101:
            if self.upgrade and upgrade:
                self.status = 101
                self.resp_reason = reason
                self.resp_out = out
                self.resp_upgrade = upgrade
                self.pending_101 = True
                return
            self.on_upstream_failure(self.upstream, "protocol", "unrequested 101 response")
            return
        if self.version == "1.1":
            # 1xx responses are forwarded (RFC 9110 §15.2), e.g. 100 Continue, 103 Early Hints
            self.client.writelines([b"HTTP/1.1 %d %s\r\n" % (status, reason or b"-"), *out, _CRLF])

    def on_response_body(self, data: bytes) -> None:
        self.resp_bytes += len(data)
        if self.resp_framing == "chunked":
            self.client.writelines(_chunk(data))
        else:
            self.client.write(data)
        self.deadline = time.monotonic() + self.server.body_idle

    def on_response_complete(self, conn: UpstreamProtocol) -> bool | None:
        """The backend's response ended cleanly: whether ``conn`` may be reused, or None
        when that was an informational response and the final one follows."""
        if self.status < 200 or self.state != RESPONDING:
            return None
        if self.resp_framing == "chunked":
            if self.resp_trailers:
                trailers = [
                    n + b": " + v + _CRLF
                    for n, v in self.resp_trailers
                    if n.lower() not in HOP_BY_HOP and n.lower() != b"content-length"
                ]
                self.client.write(b"0\r\n" + b"".join(trailers) + _CRLF)
            else:
                self.client.write(_LAST_CHUNK)
        reusable = self.upstream_keep_alive and self.body_done and self.resp_in_framing != "close"
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
        parts += self.resp_out
        parts.append(b"Connection: Upgrade\r\nUpgrade: " + self.resp_upgrade + b"\r\n\r\n")
        self.resp_out = []
        self.state = RESPONDING
        self.deadline = 0.0
        client = self.client
        client.writelines(parts)
        self.tunnel = Tunnel(client, conn, self.slot, self.server.tunnel_closed)  # type: ignore[arg-type]
        self.server.events.tunnel_opened(self.backend)  # type: ignore[arg-type]
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
            conn.detach(abort=True)
        self.upstream = None
        backend = self.backend
        if self.state == RESPONDING:
            # part of the response reached the client: never pass off a truncated body
            self.server.events.upstream_error(backend, kind)  # type: ignore[arg-type]
            self.error_kind = kind
            self.finish(abort_client=True)
            return
        if kind == RESET and self.reused and not self.same_tried:
            # a pooled connection closed before a response byte: the keep-alive race (or a
            # backend that just died, which the new connection then finds out), not held
            # against the backend by passive health
            self.server.events.upstream_error(backend, "stale", blame=False)  # type: ignore[arg-type]
        else:
            self.server.events.upstream_error(backend, kind)  # type: ignore[arg-type]
        timeout = kind == "timeout"
        status = 504 if timeout else 502
        bid = backend.id  # type: ignore[union-attr]
        msg = (
            f"backend {bid} did not answer in time"
            if timeout
            else f"backend {bid} failed: {message}"
        )
        self.retry(backend, kind, msg, status)  # type: ignore[arg-type]

    def answer_locally(self, status: int, reason: str, extra: bytes = b"") -> None:
        """When its turn comes, the proxy answers this request itself (``status``,
        ``reason``, extra header lines) and closes the connection; no backend sees it."""
        self.local = (status, reason, extra)
        self.local_close = True

    def cannot_relay(self, reason: str) -> None:
        """A valid response (or a request, h2upstream.py) this backend connection cannot
        carry for this client: 502, the connection dropped, the backend not blamed. Once:
        a finished exchange is left alone."""
        if self.state == DONE:
            return
        self._drop_upstream()
        self.fail(502, reason)

    def client_failed(self, status: int, reason: str) -> None:
        """The client broke its own request (a malformed or stalled body): answer it if no
        byte of the response went out, else cut the connection. The backend is not blamed:
        its connection is dropped without counting a failure."""
        if self.state == DONE:
            return
        client = self.client
        if self.state == PENDING and client.queue and client.queue[0] is not self:
            self.answer_locally(status, reason)
            self.body_buf = None
            return
        self.error_kind = "client"
        if self.state == RESPONDING:
            self.finish(abort_client=True)
            return
        if self.state == QUEUED:
            self.leave_queue()
        self._drop_upstream()
        client.respond_local(self, status, reason, close=True)

    def replayable(self) -> bool:
        """Safe to send again: idempotent, no body streamed, nothing sent to the client."""
        return (
            self.method in IDEMPOTENT_METHODS
            and self.framing == "none"
            and self.state in (CONNECTING, SENT)
            and not self.upgrade
        )

    def on_upstream_lost(self, conn: UpstreamProtocol, exc: BaseException | None) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            return
        if self.state == RESPONDING and self.resp_in_framing == "close" and exc is None:
            # a close-delimited response ends with the connection (RFC 9112 §6.3 item 8)
            if self.resp_framing == "chunked":
                self.client.write(_LAST_CHUNK)
            self.upstream = None
            self.finish()
            return
        if self.state in (SENT, RESPONDING):
            self.upstream = conn
            why = (
                str(exc)
                if isinstance(exc, UpstreamGone)
                else "connection closed before the response ended"
            )
            self.on_upstream_failure(conn, "reset", why)

    def on_deadline(self, now: float) -> None:
        if self.deadline_kind == "request-body":
            why = self._request_body_stalled(now)
            if why is None:
                self._request_body_deadline(now)
            else:
                self.client.to_closing()
                self.client_failed(408, why)
        elif self.deadline_kind == "queue" and self.state == QUEUED:
            self.leave_queue()
            self.fail(
                503,
                f"backend {self.backend.id} stayed at capacity",  # type: ignore[union-attr]
                retry_after=True,
            )
        elif self.deadline_kind == "response" and self.state == SENT:
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
        if self.state == QUEUED:
            self.leave_queue()
        self.state = DONE
        self.deadline = 0.0
        self._settle()
        if self.upstream is not None:
            self._drop_upstream()
        if not self.body_done:
            self.close_after = True
        self.server.events.request_done(self)
        self.client.exchange_done(self, abort=abort_client)

    def _drop_upstream(self) -> None:
        """Cut this exchange's upstream connection: its message boundaries are not known
        to be complete, so it is never reused (P6)."""
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.detach(abort=True)

    def abort(self) -> None:
        """The client went away: release everything without answering."""
        if self.state == DONE:
            return
        self.leave_queue()
        if self.tunnel is not None:
            self.tunnel.close()
        self.error_kind = self.error_kind or "client-closed"
        self.state = DONE
        self.deadline = 0.0
        self._settle()
        if self.tunnel is None:
            self._drop_upstream()
        self.server.events.request_done(self)


def refused_exchange(
    client: ClientProtocol, status: int, reason: str, extra: bytes = b""
) -> Exchange:
    """An exchange the proxy answers itself (``status``, ``reason``, extra header lines)
    and after which the client connection closes; it never reaches a backend."""
    ex = Exchange(client, "-", b"", "1.1", b"", "none", 0, False, None)
    ex.answer_locally(status, reason, extra)
    return ex


def refused_backend(backend: Upstream) -> list[Exchange]:
    """A connect to ``backend`` was refused: nothing listens there, so its idle pooled
    connections are dead too (dropped), and the exchanges waiting for one of its in-flight
    slots are returned, to move on at once rather than one timeout at a time."""
    backend.close_all()
    moved: list[Exchange] = []
    while backend.waiters:
        ex = backend.waiters.popleft()
        if ex.state == QUEUED:
            ex.state = PENDING
            ex.deadline = 0.0
            moved.append(ex)
    return moved


def wake_waiter(backend: Upstream) -> None:
    """Give a freed slot to the longest-waiting exchange still waiting for it."""
    now = time.monotonic()
    while backend.waiters:
        ex = backend.waiters.popleft()
        if ex.state == QUEUED:
            ex.state = PENDING
            ex.deadline = 0.0
            ex.take_slot(backend, now)
            return
