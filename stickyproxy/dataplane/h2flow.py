"""What the two HTTP/2 sides share (h2client.py towards clients, h2upstream.py towards
backends): a stream seen by an HTTP/1.1 protocol as its transport, whose reading pauses
by holding back flow-control credit; and sending a stream's buffered DATA as the peer's
windows allow (RFC 9113 §5.2, §6.9), then its end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

import h2.connection


class Credits(Protocol):
    """The connection side of a stream: gives received bytes back to the peer's windows."""

    transport: asyncio.Transport | None

    def credit(self, sid: int, size: int) -> None: ...


class StreamTransport(asyncio.Transport):
    """One HTTP/2 stream as the transport of an HTTP/1.1 protocol (``write`` is the
    side's own). ``pause_reading`` holds back the credit of the DATA received from then
    on (``unacked``); ``resume_reading`` gives it back: the peer can then send at most a
    stream window more while the protocol is not reading."""

    def __init__(self, conn: Credits):
        super().__init__()
        self.flow = conn
        self.id = 0
        self.pending: deque[bytes] = deque()  # DATA to send, waiting for window
        self.pending_bytes = 0
        self.paused = False  # its protocol is not taking bytes: credit is held back
        self.unacked = 0  # flow-controlled bytes taken but not yet credited
        self.write_paused = False  # its protocol was told to pause_writing

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.flow.credit(self.id, n)

    def is_reading(self) -> bool:
        return not self.paused

    def received(self, size: int) -> None:
        """``size`` flow-controlled bytes were given to the protocol: credit them now, or
        when it reads again."""
        if self.paused:
            self.unacked += size
        else:
            self.flow.credit(self.id, size)

    def backpressure(self, proto: asyncio.BaseProtocol, high: int, low: int) -> None:
        """Tell ``proto`` to stop writing once more than ``high`` bytes wait for window,
        and to go on once fewer than ``low`` do."""
        if self.pending_bytes > high:
            if not self.write_paused:
                self.write_paused = True
                proto.pause_writing()
        elif self.write_paused and self.pending_bytes < low:
            self.write_paused = False
            proto.resume_writing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self.flow.transport
        return t.get_extra_info(name, default) if t is not None else default


def send_pending(
    h2c: h2.connection.H2Connection,
    sid: int,
    pending: deque[bytes],
    may_send: bool,
    end: bool,
    trailers: list[tuple[bytes, bytes]] | None,
) -> tuple[int, int, bool]:
    """Send DATA from ``pending`` (consumed in place) as the stream's and the connection's
    windows allow, unless not ``may_send`` (the socket is write-paused); with ``end``
    (nothing more will be queued) close the stream once it is empty: with ``trailers``
    when there are, else with END_STREAM on the last DATA frame (one frame, not two) or
    on an empty one. Returns (bytes sent, DATA frames sent, whether the stream ended).
    h2's ProtocolError and ValueError pass to the caller."""
    sent = frames = 0
    while pending and may_send:
        window = h2c.local_flow_control_window(sid)
        if window <= 0:
            break
        size = min(window, h2c.max_outbound_frame_size)
        data = pending[0]
        if len(data) > size:
            chunk = data[:size]
            pending[0] = data[size:]
        else:
            chunk = pending.popleft()
        sent += len(chunk)
        frames += 1
        if not pending and end and not trailers:
            h2c.send_data(sid, chunk, end_stream=True)
            return sent, frames, True
        h2c.send_data(sid, chunk)
    if not pending and end:
        if trailers:
            h2c.send_headers(sid, trailers, end_stream=True)
        else:
            h2c.end_stream(sid)
        return sent, frames, True
    return sent, frames, False
