"""Backends the proxy forwards to, on real loopback sockets.

- ``AioBackend``: an aiohttp app that records every request (method, raw target, headers as
  (name, value) pairs with case and duplicates kept, body) and answers with a handler a test
  can replace (``echo_handler`` by default).
- ``RawBackend``: ``asyncio.start_server`` running a per-connection ``Script`` that reads
  requests with llhttp (httptools) and writes whatever bytes it likes; it keeps every raw
  byte it received. ``respond_with`` makes the common script.
- ``DeadBackend``: an address where nothing listens (every connect is refused).
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools
from aiohttp import web

from support.http import HeaderFields
from support.net import IO_TIMEOUT, LOCALHOST, free_port
from support.wire import StrictCollector

# ---------------------------------------------------------------------------------------
# what a backend received


@dataclass
class Recorded(HeaderFields):
    backend: str
    method: str
    target: str  # raw path + query, as received
    version: str
    headers: list[tuple[str, str]]  # in order, case and duplicates preserved
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    peer: tuple[str, int] | None = None  # the proxy's end of the TCP connection


def _text(pairs: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in pairs]


Handler = Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]]


async def echo_handler(request: web.Request, rec: Recorded) -> web.StreamResponse:
    """200; the body echoes the request body (or names the backend when there is none)."""
    body = rec.body if rec.body else f"{rec.backend} {rec.method} {rec.target}\n".encode()
    headers = {"X-Backend": rec.backend}
    rid = request.headers.get("X-Req-Id")
    if rid is not None:
        headers["X-Req-Id"] = rid
    return web.Response(body=body, headers=headers, content_type="text/plain")


class AioBackend:
    """A small aiohttp app on a free port that records every request it gets."""

    def __init__(self, bid: str):
        self.id = bid
        self.requests: list[Recorded] = []
        self.handler: Handler = echo_handler
        self.read_body = True  # read the whole body before calling the handler
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.running = False

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec = Recorded(
            backend=self.id,
            method=request.method,
            target=request.raw_path,
            version=f"{request.version.major}.{request.version.minor}",
            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers],
            peer=tuple(peer[:2]) if peer else None,
        )
        self.requests.append(rec)
        if self.read_body and "upgrade" not in request.headers.get("Connection", "").lower():
            rec.body = await request.read()
        return await self.handler(request, rec)

    async def start(self, port: int = 0) -> AioBackend:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self.runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOCALHOST, port or self.port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self.runner, sock)
        await site.start()
        self.running = True
        return self

    async def stop(self) -> None:
        """Stop listening and close its connections (connects are refused from now on)."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            self.running = False
            await runner.cleanup()

    # -- what it saw -----------------------------------------------------------------------
    def connections(self) -> set[tuple[str, int]]:
        """Distinct TCP connections requests arrived on (by the proxy's source address)."""
        return {r.peer for r in self.requests if r.peer}


class RawConn:
    """One accepted connection of a RawBackend: raw bytes in, scripted bytes out."""

    def __init__(
        self, backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.backend = backend
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()
        self.requests: list[Recorded] = []
        self._done: deque[Recorded] = deque()
        self._llhttp = StrictCollector(httptools.HttpRequestParser)
        self.eof = False
        peer = writer.get_extra_info("peername")
        self.peer = tuple(peer[:2]) if peer else None

    def _feed(self, data: bytes) -> None:
        """Parse with llhttp; every request it completed is recorded here and on the backend."""
        try:
            self._llhttp.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        finally:
            for m in self._llhttp.done:
                rec = Recorded(
                    self.backend.id,
                    m.method.decode(),
                    m.target.decode("latin-1"),
                    m.version.decode(),
                    _text(m.fields),
                    m.body,
                    _text(m.trailers),
                    self.peer,
                )
                self._done.append(rec)
                self.requests.append(rec)
                self.backend.requests.append(rec)
            self._llhttp.done.clear()

    async def read_some(self, n: int = 65536) -> bytes:
        data = await self.reader.read(n)
        if not data:
            self.eof = True
        self.raw += data
        return data

    async def request(self, timeout: float = IO_TIMEOUT) -> Recorded | None:
        """The next complete request on this connection; None at EOF."""
        async with asyncio.timeout(timeout):
            while not self._done:
                try:
                    data = await self.read_some()
                except ConnectionError:
                    self.eof = True
                    return None
                if not data:
                    return None
                self._feed(data)
            return self._done.popleft()

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            pass

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


Script = Callable[[RawConn], Awaitable[None]]


def respond_with(make: bytes | Callable[[Recorded], bytes], *, close: bool = False) -> Script:
    """A script answering every request with ``make`` (bytes, or a function of the request)."""

    async def script(conn: RawConn) -> None:
        while True:
            req = await conn.request()
            if req is None:
                return
            conn.send(make(req) if callable(make) else make)
            await conn.drain()
            if close:
                conn.close()
                return

    return script


class RawBackend:
    """``asyncio.start_server`` on a free port running ``script`` for each connection."""

    def __init__(self, bid: str, script: Script):
        self.id = bid
        self.script = script
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.connections: list[RawConn] = []
        self.requests: list[Recorded] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def raw(self) -> bytes:
        """Every byte received, over all connections, in accept order."""
        return b"".join(bytes(c.raw) for c in self.connections)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(self, reader, writer)
        self.connections.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self.script(conn)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def start(self, port: int = 0) -> RawBackend:
        self.server = await asyncio.start_server(
            self._handle, LOCALHOST, port or self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for t in list(self._tasks):
            t.cancel()
        for c in self.connections:
            c.writer.transport.abort()


class DeadBackend:
    """A backend address where nothing listens: every connect is refused."""

    def __init__(self, bid: str, port: int | None = None):
        self.id = bid
        self.port = port or free_port()
        self.requests: list[Recorded] = []

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"


class Started:
    """What a backend fixture started, stopped together at teardown."""

    def __init__(self) -> None:
        self.made: list[AioBackend | RawBackend] = []

    async def aio(self, *ids: str) -> list[AioBackend]:
        out = []
        for bid in ids:
            b = await AioBackend(bid).start()
            self.made.append(b)
            out.append(b)
        return out

    async def raw(self, bid: str, script: Script, port: int = 0) -> RawBackend:
        b = await RawBackend(bid, script).start(port)
        self.made.append(b)
        return b

    async def stop(self) -> None:
        for b in self.made:
            await b.stop()
