"""A small HTTP/1.1 load client on asyncio protocols and llhttp (httptools).

Two ways to drive it:

- `open_loop`: requests are issued at a fixed rate whatever the answers (wrk2-style). A
  request that finds every connection of the bounded pool busy waits for one, and that wait
  is part of its latency, so a target that falls behind is charged for it (no coordinated
  omission). The client shares the machine's cores with what it measures, so its own cost
  per request is kept small: callbacks only, no task, timer or closure per request (one
  sweep finds timed-out requests), each distinct request encoded once, response headers
  parsed only when a caller asked who served the request.
- `closed_loop`: a fixed number of connections, each sending its next request when the
  previous answer arrives; for a fixed list of requests or for a duration.

Every request yields an `Outcome`; nothing is retried. Times are `time.perf_counter()`.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httptools

from .procs import LOOPBACK

T = TypeVar("T")
USER_HEADER = "X-User-Id"
SERVED_BY_HEADERS = (b"x-served-by", b"x-backend")
DEFAULT_TIMEOUT = 5.0
# How often the open loop looks for timed-out requests: a request's timeout may run over by this.
TIMEOUT_SWEEP_S = 0.1
# The event loop's timer resolution (libuv counts milliseconds): the open loop sleeps no less.
TICK_S = 0.001
CONNECT_ERROR, RESET_ERROR = "connect", "reset"
TIMEOUT_ERROR, PROTOCOL_ERROR = "timeout", "protocol"

now = time.perf_counter


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    user: str
    body: bytes = b""
    action: str = ""

    def encode(self, host: str) -> bytes:
        head = [
            f"{self.method} {self.path} HTTP/1.1",
            f"Host: {host}",
            f"{USER_HEADER}: {self.user}",
        ]
        if self.body or self.method in ("POST", "PUT"):
            head += ["Content-Type: application/json", f"Content-Length: {len(self.body)}"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


@dataclass
class Outcome:
    request: Request
    due: float
    issued: float = 0.0
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    error: str = ""
    served_by: str = ""
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def latency(self) -> float:
        """Seconds from when the client issued the request to its answer (or failure),
        including any wait for a free connection."""
        return self.done - self.issued


@dataclass
class _Response:
    status: int = 0
    served_by: str = ""
    body: list[bytes] = field(default_factory=list)


Callback = Callable[["Connection", "_Response | None", str], None]


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time; `send` calls back once per request."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response = _Response()
        self.callback: Callback | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(None, RESET_ERROR)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()
            self._finish(None, PROTOCOL_ERROR)

    def on_message_complete(self) -> None:
        self.response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        response, self.response = self.response, _Response()
        self._finish(response, "")

    def _finish(self, response: _Response | None, error: str) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(self, response, error)

    def send(self, raw: bytes, callback: Callback) -> None:
        assert self.transport is not None and self.callback is None
        self.callback = callback
        self.transport.write(raw)

    def abandon(self) -> None:
        """Give up on the request in flight (timeout): close without calling back."""
        self.callback = None
        self.close()

    @property
    def reusable(self) -> bool:
        return not self.closed and self.keep_alive and self.callback is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


# llhttp calls a protocol's `on_header` and `on_body` only when it defines them, so a
# connection that needs neither pays for neither: a class per combination.
class _ServedBy(Connection):
    """Records which backend answered."""

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in SERVED_BY_HEADERS:
            self.response.served_by = value.decode(errors="replace")


class _Body(Connection):
    """Keeps the response body."""

    def on_body(self, body: bytes) -> None:
        self.response.body.append(body)


class _ServedByBody(_ServedBy, _Body):
    pass


CONNECTION_CLASSES: dict[tuple[bool, bool], type[Connection]] = {
    (False, False): Connection,
    (True, False): _ServedBy,
    (False, True): _Body,
    (True, True): _ServedByBody,
}


async def connect(port: int, served_by: bool = True, keep_body: bool = True) -> Connection:
    factory = CONNECTION_CLASSES[served_by, keep_body]
    _, conn = await asyncio.get_running_loop().create_connection(factory, LOOPBACK, port)
    return conn


def _record(outcome: Outcome, response: _Response | None, error: str, keep_body: bool) -> None:
    outcome.done = now()
    if response is None:
        outcome.error = error
        return
    outcome.status, outcome.served_by = response.status, response.served_by
    if keep_body:
        outcome.body = b"".join(response.body)


class _OpenLoop:
    """Issues outcomes' requests over at most `limit` connections, completing `finished`
    once `expected` outcomes are done."""

    def __init__(
        self,
        port: int,
        limit: int,
        timeout: float,
        keep_body: bool,
        served_by: bool,
        on_outcome: Callable[[Outcome], None] | None,
    ):
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.host = f"{LOOPBACK}:{port}"
        self.limit = limit
        self.timeout = timeout
        self.keep_body = keep_body
        self.served_by = served_by
        self.on_outcome = on_outcome
        self.idle: list[Connection] = []
        self.count = 0
        self.backlog: collections.deque[Outcome] = collections.deque()
        self.inflight: dict[Connection, Outcome] = {}
        self.encoded: dict[Request, bytes] = {}
        self.expected = 0
        self.completed = 0
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.sweeper = self.loop.call_later(TIMEOUT_SWEEP_S, self._sweep)

    def issue(self, outcome: Outcome) -> None:
        outcome.issued = now()
        while self.idle and self.idle[-1].closed:
            self.idle.pop()
            self.count -= 1
        if self.idle:
            self._send(self.idle.pop(), outcome)
        elif self.count < self.limit:
            self.count += 1
            self.loop.create_task(self._connect_and_send(outcome))
        else:
            self.backlog.append(outcome)

    async def _connect_and_send(self, outcome: Outcome) -> None:
        try:
            conn = await connect(self.port, self.served_by, self.keep_body)
        except OSError:
            self.count -= 1
            self._complete(outcome, None, CONNECT_ERROR)
            self._refill()
            return
        self._send(conn, outcome)

    def _send(self, conn: Connection, outcome: Outcome) -> None:
        outcome.sent = now()
        self.inflight[conn] = outcome
        request = outcome.request
        raw = self.encoded.get(request)
        if raw is None:
            raw = self.encoded[request] = request.encode(self.host)
        conn.send(raw, self._answered)

    def _answered(self, conn: Connection, response: _Response | None, error: str) -> None:
        self._complete(self.inflight.pop(conn), response, error)
        self._release(conn)

    def _sweep(self) -> None:
        """Abandon every request sent more than `timeout` s ago."""
        cutoff = now() - self.timeout
        for conn, outcome in [(c, o) for c, o in self.inflight.items() if o.sent < cutoff]:
            del self.inflight[conn]
            conn.abandon()
            self._complete(outcome, None, TIMEOUT_ERROR)
            self._release(conn)
        self.sweeper = self.loop.call_later(TIMEOUT_SWEEP_S, self._sweep)

    def _release(self, conn: Connection) -> None:
        if conn.reusable:
            if self.backlog:
                self._send(conn, self.backlog.popleft())
            else:
                self.idle.append(conn)
            return
        conn.close()
        self.count -= 1
        self._refill()

    def _refill(self) -> None:
        if self.backlog and self.count < self.limit:
            self.count += 1
            self.loop.create_task(self._connect_and_send(self.backlog.popleft()))

    def _complete(self, outcome: Outcome, response: _Response | None, error: str) -> None:
        _record(outcome, response, error, self.keep_body)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        self.completed += 1
        if self.completed == self.expected and not self.finished.done():
            self.finished.set_result(None)

    def close(self) -> None:
        self.sweeper.cancel()
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def open_loop(
    port: int,
    rate: float,
    duration: float,
    next_request: Callable[[int], Request],
    *,
    connections: int,
    timeout: float = DEFAULT_TIMEOUT,
    keep_body: bool = False,
    served_by: bool = True,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Requests due every 1/`rate` s for `duration` s; returns every outcome, in due order.

    Every request due by now is issued, then the client sleeps until the next one is due,
    never less than `TICK_S`: requests closer together than that go out together, as wrk2's
    do, instead of the client spinning on a core it shares with the target. `served_by`
    False skips reading response headers.
    """
    engine = _OpenLoop(port, connections, timeout, keep_body, served_by, on_outcome)
    engine.expected = total = int(rate * duration)
    outcomes: list[Outcome] = []
    start = now()
    i = 0
    while i < total:
        due_by_now = min(total, int((now() - start) * rate) + 1)
        while i < due_by_now:
            outcome = Outcome(next_request(i), start + i / rate)
            outcomes.append(outcome)
            engine.issue(outcome)
            i += 1
        if i < total:
            await asyncio.sleep(max(start + i / rate - now(), TICK_S))
    if total:
        await engine.finished
    engine.close()
    return outcomes


async def closed_loop(
    port: int,
    requests: Iterable[Request],
    *,
    connections: int,
    duration: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    keep_body: bool = False,
) -> list[Outcome]:
    """`connections` senders share `requests` until it ends (or `duration` s pass)."""
    host = f"{LOOPBACK}:{port}"
    source: Iterator[Request] = iter(requests)
    outcomes: list[Outcome] = []
    end = now() + duration if duration is not None else None

    async def exchange(conn: Connection, outcome: Outcome) -> None:
        answered: asyncio.Future[tuple[_Response | None, str]] = (
            asyncio.get_running_loop().create_future()
        )
        outcome.sent = now()
        conn.send(outcome.request.encode(host), lambda _c, r, e: answered.set_result((r, e)))
        try:
            async with asyncio.timeout(timeout):
                response, error = await answered
        except TimeoutError:
            conn.abandon()
            response, error = None, TIMEOUT_ERROR
        _record(outcome, response, error, keep_body)

    async def sender() -> None:
        conn: Connection | None = None
        while end is None or now() < end:
            request = next(source, None)
            if request is None:
                break
            t = now()
            outcome = Outcome(request, t, t)
            outcomes.append(outcome)
            if conn is None or not conn.reusable:
                try:
                    conn = await connect(port, keep_body=keep_body)
                except OSError:
                    _record(outcome, None, CONNECT_ERROR, keep_body)
                    conn = None
                    continue
            await exchange(conn, outcome)
        if conn is not None:
            conn.close()

    await asyncio.gather(*(sender() for _ in range(connections)))
    return outcomes


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop when it is installed, with the garbage collector off: the client's
    own pauses would otherwise show up in the latencies it measures."""
    try:
        import uvloop
    except ImportError:
        runner: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run
    else:
        runner = uvloop.run
    gc.collect()
    gc.disable()
    try:
        return runner(coro)
    finally:
        gc.enable()
