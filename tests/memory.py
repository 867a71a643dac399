"""In-memory transports for driving the data plane's protocols without sockets."""

import time

from bench.hotpath import MemoryTransport
from stickyproxy.dataplane import Proxy
from stickyproxy.dataplane.upstream import UpstreamProtocol


class Sink(MemoryTransport):
    """An in-memory transport that keeps what is written to it."""

    def __init__(self):
        super().__init__()
        self.data = bytearray()

    def write(self, data):
        super().write(data)
        self.data += data

    def writelines(self, parts):
        for p in parts:
            self.write(p)


def pooled_upstreams(proxy: Proxy) -> dict[str, tuple[UpstreamProtocol, Sink]]:
    """One idle pooled connection per backend, each writing into a Sink."""
    out = {}
    for bid, slot in proxy.upstreams.items():
        up = UpstreamProtocol(slot, time.monotonic())
        t = Sink()
        up.connection_made(t)
        slot.release(up, time.monotonic())
        out[bid] = (up, t)
    return out
