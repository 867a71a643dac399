"""A raw HTTP/1.x client for talking to the proxy byte by byte.

``Client`` writes whatever bytes a test gives it and reads responses with a strict reader
(RFC 9112: status line, field lines without obs-fold or CTLs, one framing per message, 1xx
collected); every read is bounded by a timeout. ``http_request`` builds well-formed request
bytes. ``HeaderFields`` is the field lookup shared with what backends record.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from dataclasses import dataclass, field

from support.net import IO_TIMEOUT, LOCALHOST


class HeaderFields:
    """Case-insensitive lookups over ``headers``: (name, value) pairs in order, duplicates kept."""

    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        ln = name.lower()
        return [v for n, v in self.headers if n.lower() == ln]

    def has(self, name: str) -> bool:
        return bool(self.values(name))

    def one(self, name: str) -> str:
        """The single value of ``name``; fails if absent or repeated."""
        vs = self.values(name)
        assert len(vs) == 1, f"{name}: expected exactly one field, got {vs!r} in {self.headers!r}"
        return vs[0]

    def get(self, name: str) -> str | None:
        vs = self.values(name)
        return vs[0] if vs else None


_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_STATUS_LINE = re.compile(rb"^HTTP/(\d)\.(\d) (\d{3}) ?([^\r\n]*)$")


class IncompleteResponse(AssertionError):
    """The connection ended (or reset) before a whole response arrived."""

    def __init__(self, msg: str, raw: bytes, reset: bool):
        super().__init__(f"{msg} (reset={reset}); received so far: {raw[:300]!r}")
        self.raw = raw
        self.reset = reset


@dataclass
class Response(HeaderFields):
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    informational: list[Response] = field(default_factory=list)
    framing: str = ""  # "none" | "length" | "chunked" | "close"
    raw: bytes = b""

    @property
    def wants_close(self) -> bool:
        return any(
            "close" in [t.strip().lower() for t in v.split(",")] for v in self.values("Connection")
        )


class Client:
    """A raw TCP connection to the proxy with a strict HTTP/1.x response reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self.received = bytearray()  # everything ever read, for diagnostics

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
                raise IncompleteResponse(
                    f"connection ended during {what}", bytes(self.buf), self.reset
                )

    async def _line(self, timeout: float, what: str, limit: int = 1 << 16) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                assert b"\n" not in line and b"\r" not in line, f"bare CR/LF in {line!r}"
                return line
            assert len(self.buf) < limit, f"{what}: line longer than {limit}"
            if not await self._fill(timeout):
                raise IncompleteResponse(
                    f"connection ended during {what}", bytes(self.buf), self.reset
                )

    async def _fields(self, timeout: float, what: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
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
            resp = Response(
                f"{m.group(1).decode()}.{m.group(2).decode()}",
                status,
                m.group(4).decode("latin-1"),
                await self._fields(timeout, "the head"),
            )
            if 100 <= status < 200 and status != 101:
                resp.framing = "none"
                resp.raw = bytes(self.received[start : len(self.received) - len(self.buf)])
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
            assert len(set(cls)) == 1 and re.fullmatch(r"\d+", cls[0]), (
                f"bad Content-Length {cls!r}"
            )
            n = int(cls[0])
            await self._need(n, timeout, f"a {n}-byte body")
            resp.body = bytes(self.buf[:n])
            del self.buf[:n]
            resp.framing = "length"
        else:
            resp.framing = "close"
            resp.body = await self._until_close(timeout)
        resp.raw = bytes(self.received[start : len(self.received) - len(self.buf)])
        return resp

    async def interim(self, *, timeout: float = IO_TIMEOUT) -> Response:
        """Read exactly one 1xx head (e.g. 100 Continue) and nothing after it."""
        line = await self._line(timeout, "the status line")
        m = _STATUS_LINE.match(line)
        assert m, f"malformed status line {line!r}"
        resp = Response(
            f"{m.group(1).decode()}.{m.group(2).decode()}",
            int(m.group(3)),
            m.group(4).decode("latin-1"),
            await self._fields(timeout, "the head"),
            framing="none",
        )
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
            assert self.buf[size : size + 2] == b"\r\n", "chunk data not followed by CRLF"
            del self.buf[: size + 2]

    async def _until_close(self, timeout: float) -> bytes:
        data = await self.read_until_close(timeout)
        assert not self.reset, "a close-delimited body ended with a reset"
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


def http_request(
    method: str = "GET",
    target: str = "/",
    *,
    host: str = "proxy.test",
    headers: list[tuple[str, str]] | dict[str, str] | None = None,
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    """A well-formed request (Content-Length added when there is a body)."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    lines += [f"{n}: {v}" for n, v in items]
    if body is not None and not any(
        n.lower() in ("content-length", "transfer-encoding") for n, _ in items
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
