"""In-memory transports for driving the data plane's protocols without sockets."""

import asyncio
import time

from stickyproxy.dataplane import Proxy
from stickyproxy.dataplane.upstream import UpstreamProtocol


class Sink(asyncio.Transport):
    """A transport that keeps what is written to it."""

    def __init__(self):
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data):
        self.data += data

    def writelines(self, parts):
        for p in parts:
            self.data += p

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_reading(self):
        return self.reading


def pooled_upstreams(proxy: Proxy) -> dict[str, tuple[UpstreamProtocol, Sink]]:
    """One idle pooled connection per backend, each writing into a Sink."""
    out = {}
    for bid, state in proxy.states.items():
        up = UpstreamProtocol(state, time.monotonic())
        t = Sink()
        up.connection_made(t)
        state.pool.release(up, time.monotonic())
        out[bid] = (up, t)
    return out
