"""A scriptable HTTP/2 backend for tests, made with the ``h2`` library over asyncio: it
records each request (head, body, trailers) and answers as its ``mode`` says.

Modes (``H2Backend.mode``, changeable between requests):
- "echo": 200, JSON of the request head and body size, plus trailer ``x-trailer: done``
- "refuse": RST_STREAM REFUSED_STREAM to every request (RFC 9113 §8.7)
- "goaway": GOAWAY with last_stream_id 0 and the connection closed (nothing processed)
- "drain": GOAWAY naming this stream as the last (RFC 9113 §6.8: it is still answered,
  as "echo"), then the answer; the connection stays open
- "short": 200 with content-length 10 and 3 bytes, then END_STREAM (malformed)
- "reset-mid": 200, some DATA, then RST_STREAM INTERNAL_ERROR
- "big": 200 and ``big_size`` bytes of body (flow-controlled by the proxy's windows)
- "trailers-only": HEADERS with END_STREAM holding :status 200 and grpc-status 7
With ``hold_window`` the backend never credits request DATA (its windows stay as they
are: 65,535 bytes per stream), to test the proxy's backpressure towards its client.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_mod
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

_FILL = b"x" * 65536  # body bytes of mode "big" (a frame is at most this long here)


@dataclass
class Seen:
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False

    def field(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class _Conn(asyncio.Protocol):
    def __init__(self, backend: H2Backend):
        self.backend = backend
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.seen: dict[int, Seen] = {}
        self.pending: dict[int, int] = {}  # stream -> body bytes still to send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.connections += 1
        self.backend.live.add(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.backend.live.discard(self)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.h2.state_machine.state == h2.connection.ConnectionState.CLOSED:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            self.event(ev)
        self.flush()

    def event(self, ev: Any) -> None:
        b = self.backend
        if isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id
            s = self.seen[sid] = Seen(list(ev.headers))
            b.requests.append(s)
            if b.mode == "refuse":
                self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            elif b.mode == "goaway":
                self.h2.close_connection(last_stream_id=0)
                self.flush()
                assert self.transport is not None
                self.transport.close()
            elif b.mode == "drain":
                # written beside h2's output: h2's own GOAWAY would refuse the answer after it
                self.flush()
                assert self.transport is not None
                self.transport.write(GoAwayFrame(0, last_stream_id=sid).serialize())
                if ev.stream_ended:
                    s.ended = True
                    self.respond(sid)
            elif ev.stream_ended:
                s.ended = True
                self.respond(sid)
        elif isinstance(ev, h2.events.DataReceived):
            s = self.seen.get(ev.stream_id)
            if s is not None:
                s.body += ev.data
            if not b.hold_window:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            s = self.seen.get(ev.stream_id)
            if s is not None:
                s.trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.seen.get(ev.stream_id)
            if s is not None and not s.ended:
                s.ended = True
                if b.mode not in ("refuse", "goaway"):
                    self.respond(ev.stream_id)
        elif isinstance(ev, h2.events.WindowUpdated):
            self.push_pending()
        b.changed.set()

    def respond(self, sid: int) -> None:
        b = self.backend
        s = self.seen[sid]
        if b.mode in ("echo", "drain") and s.field(b":method") == b"HEAD":
            # RFC 9110 §9.3.2: the head of the GET response, no content (h2 holds us to it)
            self.h2.send_headers(
                sid, [(b":status", b"200"), (b"content-type", b"application/json")], end_stream=True
            )
        elif b.mode in ("echo", "drain"):
            body = json.dumps(
                {
                    "backend": b.id,
                    "method": (s.field(b":method") or b"").decode(),
                    "path": (s.field(b":path") or b"").decode(),
                    "authority": (s.field(b":authority") or b"").decode(),
                    "scheme": (s.field(b":scheme") or b"").decode(),
                    "size": len(s.body),
                    "trailers": {k.decode(): v.decode() for k, v in s.trailers},
                    "headers": [[k.decode(), v.decode()] for k, v in s.headers],
                }
            ).encode()
            self.h2.send_headers(
                sid, [(b":status", b"200"), (b"content-type", b"application/json")]
            )
            self.h2.send_data(sid, body)
            self.h2.send_headers(sid, [(b"x-trailer", b"done")], end_stream=True)
        elif b.mode == "short":
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"10")])
            self.h2.send_data(sid, b"abc", end_stream=True)
        elif b.mode == "reset-mid":
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.h2.send_data(sid, b"partial")
            self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        elif b.mode == "big":
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.pending[sid] = b.big_size
            self.push_pending()
        elif b.mode == "trailers-only":
            self.h2.send_headers(
                sid,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", b"7"),
                    (b"grpc-message", b"denied"),
                ],
                end_stream=True,
            )

    def push_pending(self) -> None:
        """Send what the windows allow of the pending bodies (counted: ``sent``)."""
        for sid, left in list(self.pending.items()):
            while left:
                window = self.h2.local_flow_control_window(sid)
                if window <= 0:
                    break
                n = min(window, self.h2.max_outbound_frame_size, left)
                self.h2.send_data(sid, _FILL[:n])
                left -= n
                self.backend.sent += n
            if left:
                self.pending[sid] = left
            else:
                del self.pending[sid]
                self.h2.end_stream(sid)
        self.flush()


class H2Backend:
    """``await H2Backend("id").start()``; ``url``/``protocol`` make it a [[backends]] entry."""

    def __init__(self, bid: str, ssl: ssl_mod.SSLContext | None = None):
        self.id = bid
        self.protocol = "h2"
        self.ssl = ssl
        self.mode = "echo"
        self.hold_window = False
        self.big_size = 1024 * 1024
        self.sent = 0
        self.requests: list[Seen] = []
        self.connections = 0
        self.live: set[_Conn] = set()
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> H2Backend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in list(self.live):
                if c.transport is not None:
                    c.transport.abort()
            await self.server.wait_closed()
            self.server = None
