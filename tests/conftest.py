"""Shared fixtures for the data-plane tests: real sockets on 127.0.0.1, real backends, no mocks.

- ``backends`` makes recording aiohttp backends (what each received: method, raw target,
  headers as (name, value) pairs with case and duplicates kept, body), each with a handler
  a test can replace; ``raw_backends`` makes byte-exact ``asyncio.start_server`` backends
  driven by a per-connection script, which also keep every raw byte they received.
- ``proxy`` builds a TOML file from a list of backends plus per-section overrides, starts an
  in-process ``Service`` on an ephemeral port and stops it at teardown.
- ``Client`` is a raw TCP client with a strict HTTP/1.x response reader (every read bounded
  by ``asyncio.timeout``); ``route_json`` runs ``stickyproxy route --json`` in a subprocess.
- ``proxy_process`` runs ``stickyproxy run`` as a subprocess (SIGTERM, --workers, RSS).

Test modules import the helpers with ``from conftest import ...`` (tests/ has no
``__init__.py``, so this file is the top-level module ``conftest``).

Event loop: tests under tests/dataplane run on uvloop, the loop the proxy runs on in
production. pytest-asyncio 1.5 still honours a session-scoped ``event_loop_policy`` fixture
returning ``uvloop.EventLoopPolicy()``, but overriding that fixture is deprecated there (a
PytestDeprecationWarning on every test) and, defined here, it would switch the loop under
tests/context and the other suites as well. The replacement hook,
``pytest_asyncio_loop_factories``, is used instead, scoped to tests/dataplane.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvloop
from aiohttp import web

from stickyproxy.config import Config, loads
from stickyproxy.routing.ring import Member, Ring
from stickyproxy.control.server import Service

LOCALHOST = "127.0.0.1"
# Upper bound on any single network wait in a test (a hang fails, it never blocks CI).
IO_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------
# which build of the hot path is under test (stickyproxy/compiled.py)

def pytest_report_header(config):
    from stickyproxy import compiled
    return f"stickyproxy data plane: {compiled.build()}"


def pytest_sessionstart(session):
    from stickyproxy import compiled
    problem = compiled.stale_problem()
    if problem:
        pytest.exit(problem, returncode=4)


# ---------------------------------------------------------------------------------------
# the event loop

_DATAPLANE = Path(__file__).parent / "dataplane"


def pytest_asyncio_loop_factories(config, item):
    """uvloop for tests/dataplane; elsewhere the loop the current policy makes, as before."""
    if _DATAPLANE in Path(str(item.path)).parents:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


# ---------------------------------------------------------------------------------------
# small helpers

def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


async def eventually(predicate: Callable[[], Any], *, deadline: float = IO_TIMEOUT,
                     interval: float = 0.01, what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {deadline}s")
        await asyncio.sleep(interval)


def _lower_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    ln = name.lower()
    return [v for n, v in headers if n.lower() == ln]


# ---------------------------------------------------------------------------------------
# what a backend received

@dataclass
class Recorded:
    backend: str
    method: str
    target: str                       # raw path + query, as received
    version: str
    headers: list[tuple[str, str]]    # in order, case and duplicates preserved
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    peer: tuple[str, int] | None = None  # the proxy's end of the TCP connection

    def values(self, name: str) -> list[str]:
        return _lower_values(self.headers, name)

    def has(self, name: str) -> bool:
        return bool(self.values(name))

    def one(self, name: str) -> str:
        """The single value of ``name``; fails if absent or repeated."""
        vs = self.values(name)
        assert len(vs) == 1, f"{name}: expected exactly one field, got {vs!r} in {self.headers!r}"
        return vs[0]


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
        self.read_body = True           # read the whole body before calling the handler
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.running = False

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec = Recorded(
            backend=self.id, method=request.method, target=request.raw_path,
            version=f"{request.version.major}.{request.version.minor}",
            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers],
            peer=tuple(peer[:2]) if peer else None)
        self.requests.append(rec)
        if self.read_body and "upgrade" not in request.headers.get("Connection", "").lower():
            rec.body = await request.read()
        return await self.handler(request, rec)

    async def start(self, port: int = 0) -> AioBackend:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=0.5)
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

    def __init__(self, backend: RawBackend, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.backend = backend
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()
        self.requests: list[Recorded] = []
        self._done: deque[Recorded] = deque()
        self._cur: Recorded | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = False
        self.eof = False
        peer = writer.get_extra_info("peername")
        self.peer = tuple(peer[:2]) if peer else None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._cur = Recorded(self.backend.id, "", "", "", [], peer=self.peer)
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        assert self._cur is not None
        self._cur.target += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._cur is not None
        pair = (name.decode("latin-1"), value.decode("latin-1"))
        (self._cur.headers if self._in_head else self._cur.trailers).append(pair)

    def on_headers_complete(self) -> None:
        assert self._cur is not None
        self._in_head = False
        self._cur.method = self._parser.get_method().decode()
        self._cur.version = self._parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        assert self._cur is not None
        self._cur.body += body

    def on_message_complete(self) -> None:
        assert self._cur is not None
        self._done.append(self._cur)
        self.requests.append(self._cur)
        self.backend.requests.append(self._cur)
        self._cur = None

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
                try:
                    self._parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
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
        self.server = await asyncio.start_server(self._handle, LOCALHOST, port or self.port,
                                                 reuse_address=True)
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


@pytest.fixture
async def backends():
    """``await backends("a", "b", ...)`` → started AioBackends (stopped at teardown)."""
    made: list[AioBackend] = []

    async def make(*ids: str) -> list[AioBackend]:
        out = []
        for bid in ids:
            b = await AioBackend(bid).start()
            made.append(b)
            out.append(b)
        return out

    yield make
    for b in made:
        await b.stop()


@pytest.fixture
async def raw_backend():
    """``await raw_backend("id", script)`` → a started RawBackend (stopped at teardown)."""
    made: list[RawBackend] = []

    async def make(bid: str, script: Script, port: int = 0) -> RawBackend:
        b = await RawBackend(bid, script).start(port)
        made.append(b)
        return b

    yield make
    for b in made:
        await b.stop()


# ---------------------------------------------------------------------------------------
# configuration

BASE_CONFIG: dict[str, dict[str, Any]] = {
    "listen": {"host": LOCALHOST, "port": 0},
    "admin": {"enabled": False},
    "health": {"enabled": False},
    "passive": {"connect_down": "2s"},
    "timeouts": {"connect": "1s", "response": "5s", "client_header": "5s", "shutdown": "3s"},
    "logging": {"level": "error"},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)          # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def build_toml(backends: list[Any], overrides: dict[str, dict[str, Any]] | None = None,
               *, base: dict[str, dict[str, Any]] | None = None) -> str:
    """A config: BASE_CONFIG (or ``base``) with ``overrides`` merged per section."""
    sections = {k: dict(v) for k, v in (BASE_CONFIG if base is None else base).items()}
    for name, values in (overrides or {}).items():
        sections.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for b in backends:
        lines += ["[[backends]]", f"id = {_toml_value(b.id)}", f"url = {_toml_value(b.url)}"]
        if getattr(b, "weight", None):
            lines.append(f"weight = {b.weight}")
        lines.append("")
    return "\n".join(lines)


def ring_of(config: Config) -> Ring:
    return Ring([Member(b.id, b.weight) for b in config.backends], config.routing.vnodes)


def route_json(config_path: str | os.PathLike, *keys: str) -> dict[str, list[str]]:
    """``stickyproxy route -c FILE --json KEY...`` in a subprocess: {key: preference list}."""
    out = subprocess.run([sys.executable, "-m", "stickyproxy.cli", "route", "-c",
                          str(config_path), "--json", "--", *keys],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result = {}
    for line in out.stdout.splitlines():
        doc = json.loads(line)
        assert doc["backend"] == (doc["preference"][0] if doc["preference"] else None)
        result[doc["key"]] = doc["preference"]
    assert set(result) == set(keys)
    return result


# ---------------------------------------------------------------------------------------
# the raw client

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_STATUS_LINE = re.compile(rb"^HTTP/(\d)\.(\d) (\d{3}) ?([^\r\n]*)$")


class IncompleteResponse(AssertionError):
    """The connection ended (or reset) before a whole response arrived."""

    def __init__(self, msg: str, raw: bytes, reset: bool):
        super().__init__(f"{msg} (reset={reset}); received so far: {raw[:300]!r}")
        self.raw = raw
        self.reset = reset


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    informational: list[Response] = field(default_factory=list)
    framing: str = ""                 # "none" | "length" | "chunked" | "close"
    raw: bytes = b""

    def values(self, name: str) -> list[str]:
        return _lower_values(self.headers, name)

    def has(self, name: str) -> bool:
        return bool(self.values(name))

    def one(self, name: str) -> str:
        vs = self.values(name)
        assert len(vs) == 1, f"{name}: expected exactly one field, got {vs!r} in {self.headers!r}"
        return vs[0]

    def get(self, name: str) -> str | None:
        vs = self.values(name)
        return vs[0] if vs else None

    @property
    def wants_close(self) -> bool:
        return any("close" in [t.strip().lower() for t in v.split(",")]
                   for v in self.values("Connection"))


class Client:
    """A raw TCP connection to the proxy with a strict HTTP/1.x response reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self.received = bytearray()       # everything ever read, for diagnostics

    @classmethod
    async def connect(cls, port: int, *, timeout: float = IO_TIMEOUT) -> Client:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(LOCALHOST, port, limit=1 << 20)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def send_drain(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def shutdown_write(self) -> None:
        self.writer.write_eof()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    def send_rst(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0): a client that crashed."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def _fill(self, timeout: float) -> bool:
        """Read more bytes into the buffer; False at EOF (or reset)."""
        if self.eof:
            return False
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(1 << 20)
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.received += data
        return True

    async def _need(self, n: int, timeout: float, what: str) -> None:
        while len(self.buf) < n:
            if not await self._fill(timeout):
                raise IncompleteResponse(f"connection ended during {what}", bytes(self.buf),
                                         self.reset)

    async def _line(self, timeout: float, what: str, limit: int = 1 << 16) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                assert b"\n" not in line and b"\r" not in line, f"bare CR/LF in {line!r}"
                return line
            assert len(self.buf) < limit, f"{what}: line longer than {limit}"
            if not await self._fill(timeout):
                raise IncompleteResponse(f"connection ended during {what}", bytes(self.buf),
                                         self.reset)

    async def _fields(self, timeout: float, what: str) -> list[tuple[str, str]]:
        out = []
        while True:
            line = await self._line(timeout, what)
            if not line:
                return out
            assert line[:1] not in (b" ", b"\t"), f"obs-fold in {what}: {line!r}"
            name, sep, value = line.partition(b":")
            assert sep and _TOKEN.match(name), f"malformed field line in {what}: {line!r}"
            assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value), f"CTL in {line!r}"
            out.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))

    async def response(self, *, head: bool = False, timeout: float = IO_TIMEOUT) -> Response:
        """Read one complete final response (1xx are collected into ``informational``).

        ``head``: the request was HEAD (the response has no body whatever its fields say).
        ``timeout`` bounds each read, not the whole response.
        """
        infos: list[Response] = []
        while True:
            start = len(self.received) - len(self.buf)
            line = await self._line(timeout, "the status line")
            m = _STATUS_LINE.match(line)
            assert m, f"malformed status line {line!r}"
            status = int(m.group(3))
            resp = Response(f"{m.group(1).decode()}.{m.group(2).decode()}", status,
                            m.group(4).decode("latin-1"), await self._fields(timeout, "the head"))
            if 100 <= status < 200 and status != 101:
                resp.framing = "none"
                resp.raw = bytes(self.received[start:len(self.received) - len(self.buf)])
                infos.append(resp)
                continue
            resp.informational = infos
            break
        te = [t.strip().lower() for v in resp.values("Transfer-Encoding") for t in v.split(",")]
        cls = resp.values("Content-Length")
        if head or status in (101, 204, 304):
            resp.framing = "none"
        elif te:
            assert not cls, f"both Transfer-Encoding and Content-Length: {resp.headers!r}"
            if te[-1] == "chunked":
                resp.framing = "chunked"
                resp.body, resp.trailers = await self._chunked(timeout)
            else:
                resp.framing = "close"
                resp.body = await self._until_close(timeout)
        elif cls:
            assert len(set(cls)) == 1 and re.fullmatch(r"\d+", cls[0]), f"bad Content-Length {cls!r}"
            n = int(cls[0])
            await self._need(n, timeout, f"a {n}-byte body")
            resp.body = bytes(self.buf[:n])
            del self.buf[:n]
            resp.framing = "length"
        else:
            resp.framing = "close"
            resp.body = await self._until_close(timeout)
        resp.raw = bytes(self.received[start:len(self.received) - len(self.buf)])
        return resp

    async def interim(self, *, timeout: float = IO_TIMEOUT) -> Response:
        """Read exactly one 1xx head (e.g. 100 Continue) and nothing after it."""
        line = await self._line(timeout, "the status line")
        m = _STATUS_LINE.match(line)
        assert m, f"malformed status line {line!r}"
        resp = Response(f"{m.group(1).decode()}.{m.group(2).decode()}", int(m.group(3)),
                        m.group(4).decode("latin-1"), await self._fields(timeout, "the head"),
                        framing="none")
        assert 100 <= resp.status < 200, f"expected an interim response, got {resp.status}"
        return resp

    async def _chunked(self, timeout: float) -> tuple[bytes, list[tuple[str, str]]]:
        body = bytearray()
        while True:
            line = await self._line(timeout, "a chunk size")
            size_s = line.split(b";", 1)[0]
            assert re.fullmatch(rb"[0-9A-Fa-f]+", size_s), f"bad chunk size line {line!r}"
            size = int(size_s, 16)
            if size == 0:
                trailers = await self._fields(timeout, "the trailer section")
                return bytes(body), trailers
            await self._need(size + 2, timeout, "chunk data")
            body += self.buf[:size]
            assert self.buf[size:size + 2] == b"\r\n", "chunk data not followed by CRLF"
            del self.buf[:size + 2]

    async def _until_close(self, timeout: float) -> bytes:
        while await self._fill(timeout):
            pass
        assert not self.reset, "a close-delimited body ended with a reset"
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def read_until_close(self, timeout: float = IO_TIMEOUT) -> bytes:
        """Everything up to EOF (or reset) — fails if the connection stays open."""
        while await self._fill(timeout):
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def closed(self, timeout: float = IO_TIMEOUT) -> bool:
        """True once the proxy closed (or reset) the connection with no further bytes."""
        while await self._fill(timeout):
            pass
        return not self.buf

    async def is_idle_open(self, wait: float) -> bool:
        """Nothing arrives and the connection stays open for ``wait`` seconds."""
        try:
            await self._fill(wait)
        except TimeoutError:
            return not self.eof and not self.buf
        return False


def http_request(method: str = "GET", target: str = "/", *, host: str = "proxy.test",
                 headers: list[tuple[str, str]] | dict[str, str] | None = None,
                 body: bytes | None = None, version: str = "1.1") -> bytes:
    """A well-formed request (Content-Length added when there is a body)."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    lines += [f"{n}: {v}" for n, v in items]
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding")
                                    for n, _ in items):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# ---------------------------------------------------------------------------------------
# the proxy, in process

@dataclass
class ProxyHandle:
    svc: Service
    path: Path
    toml: str

    @property
    def config(self) -> Config:
        return self.svc.config

    @property
    def port(self) -> int:
        return self.svc.proxy.port

    @property
    def fingerprint(self) -> str:
        return ring_of(self.config).fingerprint

    def pref(self, key: str) -> list[str]:
        return ring_of(self.config).preference(key)

    async def client(self) -> Client:
        return await Client.connect(self.port)

    async def exchange(self, raw: bytes, *, head: bool = False,
                       timeout: float = IO_TIMEOUT) -> Response:
        """Send ``raw`` on a new connection, read one response, close."""
        c = await self.client()
        try:
            c.send(raw)
            return await c.response(head=head, timeout=timeout)
        finally:
            c.close()

    async def get(self, target: str = "/", *, user: str | None = None,
                  headers: dict[str, str] | None = None, method: str = "GET",
                  body: bytes | None = None, timeout: float = IO_TIMEOUT) -> Response:
        h = dict(headers or {})
        if user is not None:
            h["X-User-Id"] = user
        return await self.exchange(http_request(method, target, headers=h, body=body),
                                   head=method == "HEAD", timeout=timeout)


@pytest.fixture
async def proxy(tmp_path):
    """``await proxy(backends, {"section": {...}})`` → a started in-process ProxyHandle."""
    started: list[Service] = []

    async def make(backend_list: list[Any], overrides: dict[str, dict[str, Any]] | None = None,
                   *, name: str = "proxy.toml") -> ProxyHandle:
        text = build_toml(backend_list, overrides)
        path = tmp_path / name
        path.write_text(text)
        svc = Service(loads(text, str(path)), str(path))
        await svc.start()
        started.append(svc)
        return ProxyHandle(svc, path, text)

    yield make
    for svc in started:
        if not svc.stopped.is_set():
            await asyncio.wait_for(svc.stop(), 10)


# ---------------------------------------------------------------------------------------
# the proxy, as a subprocess

class ProxyProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the proxy accepts a connection and answers a request."""
        end = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"proxy exited early:\n{self.output()}"
            try:
                c = await Client.connect(self.port, timeout=1)
                try:
                    c.send(http_request("GET", "/__ready", headers={"X-User-Id": "ready"}))
                    r = await c.response(timeout=2)
                    if r.status < 500:
                        return
                finally:
                    c.close()
            except (OSError, AssertionError, TimeoutError):
                pass
            if time.monotonic() > end:
                raise AssertionError(f"proxy not ready in {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"proxy did not exit in {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def status_field(self, name: str, pid: int | None = None) -> int:
        """A kB field of /proc/PID/status (VmHWM, VmRSS)."""
        with open(f"/proc/{pid or self.pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        raise KeyError(name)


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc/*/stat parent links)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents[int(d)] = ppid
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        nxt = {p for p, pp in parents.items() if pp in frontier and p not in out}
        out |= nxt
        frontier = nxt
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


@pytest.fixture
def proxy_process(tmp_path):
    """``proxy_process(backends, overrides, workers=1)`` → a started ProxyProcess.

    Its listen port is a fixed free port (workers share it with SO_REUSEPORT). Whatever is
    still running at teardown (the process group this fixture created) is killed.
    """
    procs: list[ProxyProcess] = []

    def make(backend_list: list[Any], overrides: dict[str, dict[str, Any]] | None = None,
             *, workers: int = 1) -> ProxyProcess:
        port = free_port()
        ov = {k: dict(v) for k, v in (overrides or {}).items()}
        ov.setdefault("listen", {})["port"] = port
        text = build_toml(backend_list, ov)
        path = tmp_path / f"proxy-{len(procs)}.toml"
        path.write_text(text)
        log = tmp_path / f"proxy-{len(procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(path),
                 "--workers", str(workers)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        p = ProxyProcess(proc, port, log)
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.proc.poll() is None:
            try:
                os.killpg(p.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.proc.wait(10)
