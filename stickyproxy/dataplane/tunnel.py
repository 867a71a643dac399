"""A byte tunnel between a client and a backend after the backend answered 101 (WebSocket).

Bytes flow both ways unchanged, with backpressure: a side whose peer's write buffer is
above its high-water mark stops being read. When either side closes, the other is closed
once what it was sent is flushed. An idle tunnel is closed after ``websocket_idle``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import ClientProtocol
    from .upstream import Upstream, UpstreamProtocol


class Tunnel:
    __slots__ = ("client", "upstream", "slot", "last_activity", "closed", "on_close")

    def __init__(
        self, client: ClientProtocol, upstream: UpstreamProtocol, slot: Upstream, on_close
    ):
        self.client = client
        self.upstream = upstream
        self.slot = slot
        self.last_activity = time.monotonic()
        self.closed = False
        self.on_close = on_close
        slot.tunnels.add(self)

    def from_client(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = time.monotonic()
        self.upstream.transport.write(data)  # type: ignore[union-attr]

    def from_upstream(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = time.monotonic()
        self.client.write(data)

    # backpressure: the writer side's buffer is full → stop reading the other side
    def client_write_paused(self) -> None:
        self.upstream.pause_reading()

    def client_write_resumed(self) -> None:
        self.upstream.resume_reading()

    def upstream_write_paused(self) -> None:
        self.client.pause_reading(self.client.PAUSE_BACKPRESSURE)

    def upstream_write_resumed(self) -> None:
        self.client.resume_reading(self.client.PAUSE_BACKPRESSURE)

    def idle_expired(self, now: float, idle: float) -> bool:
        return now - self.last_activity > idle

    def close(self) -> None:
        """Close both sides after flushing what each was sent."""
        if self.closed:
            return
        self.closed = True
        self.slot.tunnels.discard(self)
        self.upstream.detach(abort=False)
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.close()
        self.on_close(self)
