"""CPU cost of the data plane's Python path per request, without sockets.

Feeds a request into a ClientProtocol and a response into the UpstreamProtocol it chose,
over in-memory transports, and reports microseconds per request. This isolates the
proxy's own work from syscalls and from the load generator sharing the CPU.

    python -m bench.hotpath [--requests N] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from stickyproxy.config import loads
from stickyproxy.control.process import build_process
from stickyproxy.dataplane.client import ClientProtocol
from stickyproxy.dataplane.upstream import UpstreamProtocol

CONFIG = """
[listen]
port = 0
[admin]
enabled = false
[health]
enabled = false
[limits]
pool_max_requests = 100000000
[[backends]]
id = "app-1"
url = "http://127.0.0.1:1"
[[backends]]
id = "app-2"
url = "http://127.0.0.1:2"
[[backends]]
id = "app-3"
url = "http://127.0.0.1:3"
"""

REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-User-Id: %d\r\n"
    b"User-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 26 Nov 2026 04:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


ROUNDS = 3
PROFILE_LINES = 25


class MemoryTransport(asyncio.Transport):
    def __init__(self, peer=("127.0.0.1", 50000)):
        super().__init__()
        self.sent = 0
        self.reading = True
        self.closing = False
        self.peer = peer

    def write(self, data):
        self.sent += len(data)

    def writelines(self, parts):
        for p in parts:
            self.sent += len(p)

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_reading(self):
        return self.reading


def run(n: int, profile: cProfile.Profile | None = None, with_metrics: bool = True) -> float:
    """CPU microseconds per request over `n` requests (profiled by `profile` if given)."""

    async def main() -> float:
        cfg = loads(CONFIG)
        proc = build_process(cfg, "single")
        obs, proxy = proc.observer, proc.proxy
        obs.metrics_enabled = with_metrics
        # one pooled upstream connection per backend, answering from memory
        ups = {}
        for bid, slot in proxy.upstreams.items():
            up = UpstreamProtocol(slot, time.monotonic())
            up.connection_made(MemoryTransport())
            slot.release(up, time.monotonic())
            ups[bid] = up
        client = ClientProtocol(proxy)
        client.connection_made(MemoryTransport())
        requests = [REQUEST % (i % 10000) for i in range(n)]
        t0 = time.process_time()
        if profile:
            profile.enable()
        for req in requests:
            client.data_received(req)
            ex = client.queue[0]
            ex.upstream.data_received(RESPONSE)
        if profile:
            profile.disable()
        return (time.process_time() - t0) / n * 1e6

    return asyncio.run(main())


def cost(n: int, rounds: int = ROUNDS) -> dict[str, float]:
    """Best of `rounds` runs, with and without metrics: other load on the machine inflates
    wall-clock figures far more than it inflates these CPU times."""
    with_metrics = min(run(n, with_metrics=True) for _ in range(rounds))
    without = min(run(n, with_metrics=False) for _ in range(rounds))
    return {
        "us_per_request": with_metrics,
        "us_per_request_without_metrics": without,
        "metrics_share": (with_metrics - without) / with_metrics,
    }


def profile_rows(n: int, limit: int = PROFILE_LINES) -> list[dict[str, Any]]:
    """The functions with the most own time on the path, per request."""
    prof = cProfile.Profile()
    run(n, prof)
    stats = pstats.Stats(prof)
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    rows = []
    for (path, line, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        calls, tottime, cumtime = entry[1], entry[2], entry[3]
        rows.append(
            {
                "function": name,
                "where": f"{_short(path)}:{line}",
                "calls_per_request": calls / n,
                "own_us_per_request": tottime / n * 1e6,
                "own_share": tottime / total if total else 0.0,
                "cumulative_us_per_request": cumtime / n * 1e6,
            }
        )
    rows.sort(key=lambda r: r["own_us_per_request"], reverse=True)
    return rows[:limit]


def _short(path: str) -> str:
    for marker in ("stickyproxy/", "site-packages/", "lib/python"):
        if marker in path:
            return path[path.index(marker) :]
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    if a.profile:
        prof = cProfile.Profile()
        run(a.requests, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(PROFILE_LINES)
        return
    c = cost(a.requests)
    print(
        f"{c['us_per_request']:.2f} us/request with metrics, "
        f"{c['us_per_request_without_metrics']:.2f} us without "
        f"({c['metrics_share']:.1%} for metrics and access-log checks)"
    )


if __name__ == "__main__":
    main()
