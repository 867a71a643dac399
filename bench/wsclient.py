"""A minimal WebSocket echo client: each connection keeps one message in flight.

Client frames are masked with an all-zero key (valid per RFC 6455 §5.3, and it keeps the
client's own cost out of the figures); payloads are under 126 bytes, so every frame has a
two-byte header plus the four-byte mask.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass, field

from .httpclient import USER_HEADER
from .procs import LOOPBACK

HEAD_END = b"\r\n\r\n"
TEXT_FIN = 0x81
MASKED = 0x80
ZERO_MASK = b"\x00\x00\x00\x00"
MAX_SHORT_PAYLOAD = 125
HANDSHAKE_TIMEOUT = 5.0


class HandshakeError(Exception):
    """The server (or the proxy) did not switch protocols."""


def client_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_SHORT_PAYLOAD:
        raise ValueError("payload must be at most 125 bytes")
    return bytes((TEXT_FIN, MASKED | len(payload))) + ZERO_MASK + payload


@dataclass
class EchoStats:
    messages: int = 0
    latencies: list[float] = field(default_factory=list)


class EchoConnection(asyncio.Protocol):
    def __init__(self, path: str, user: str, host: str, payload: bytes, stats: EchoStats):
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{USER_HEADER}: {user}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.frame = client_frame(payload)
        self.expected = 2 + len(payload)
        self.stats = stats
        self.buffer = bytearray()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.running = False
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.running = False
        if not self.upgraded.done():
            self.upgraded.set_exception(HandshakeError(f"connection closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(HEAD_END)
            if end < 0:
                return
            status_line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            del self.buffer[: end + len(HEAD_END)]
            if b" 101 " not in status_line + b" ":
                self.upgraded.set_exception(HandshakeError(status_line.decode(errors="replace")))
                return
            self.upgraded.set_result(None)
        while len(self.buffer) >= self.expected:
            del self.buffer[: self.expected]
            self.stats.messages += 1
            self.stats.latencies.append(time.perf_counter() - self.sent_at)
            if self.running:
                self._send()

    def start(self) -> None:
        self.running = True
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.frame)

    def stop(self) -> None:
        self.running = False
        if self.transport is not None:
            self.transport.close()


async def echo_run(
    port: int, path: str, users: list[str], payload: bytes, duration: float
) -> EchoStats:
    """Open one connection per user, then echo `payload` on all of them for `duration` s."""
    loop = asyncio.get_running_loop()
    stats = EchoStats()
    host = f"{LOOPBACK}:{port}"
    conns: list[EchoConnection] = []
    try:
        for user in users:
            _, conn = await loop.create_connection(
                lambda u=user: EchoConnection(path, u, host, payload, stats), LOOPBACK, port
            )
            conns.append(conn)
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await conn.upgraded
        for conn in conns:
            conn.start()
        await asyncio.sleep(duration)
    finally:
        for conn in conns:
            conn.stop()
    return stats
