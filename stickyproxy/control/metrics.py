"""The proxy's metrics, defined once, recorded as plain numbers, exported by prometheus-client.

Recording must cost the hot path almost nothing, so requests only bump entries of plain
dicts (no locks, no label look-ups); a custom collector turns them into Prometheus families
when /metrics is scraped. With several workers each worker sends its ``snapshot()`` to the
supervisor, which sums them (``merge``) and exports the total.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

PREFIX = "stickyproxy_"

# Upstream latency buckets (seconds): sub-millisecond to the default response timeout.
# Typed as a variable-length tuple: compiled, a fixed-length tuple of floats would be
# stored unboxed and re-boxed (15 new floats) on every bisect.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# name → (kind, help, label names). Counters' exported names get "_total" from the family.
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "requests": (
        "counter",
        "Requests answered, by backend and status class",
        ("backend", "code_class"),
    ),
    "request_duration_seconds": (
        "histogram",
        "Time from routing to the end of the response",
        ("backend",),
    ),
    "route_decisions": (
        "counter",
        "Routing decisions by result (primary, failover, spill, no_key, panic, unavailable)",
        ("result",),
    ),
    "spills": (
        "counter",
        "Requests bounded load (routing.balance_factor) moved off a "
        "backend above its bound, by that backend",
        ("backend",),
    ),
    "retries": (
        "counter",
        "Requests retried away from a backend, by reason",
        ("backend", "reason"),
    ),
    "retries_denied": (
        "counter",
        "Failed attempts not retried, by why not (budget, attempts, no-backend, not-replayable)",
        ("backend", "reason"),
    ),
    "upstream_errors": ("counter", "Failures talking to a backend, by kind", ("backend", "kind")),
    "rejected_requests": ("counter", "Requests the proxy refused itself, by status", ("status",)),
    "health_checks": ("counter", "Active health checks by result", ("backend", "result")),
    "ejections": ("counter", "Passive ejections of a backend", ("backend",)),
    "ring_changes": ("counter", "Reloads that changed the ring", ()),
    "reloads": ("counter", "Configuration reloads by result", ("result",)),
    "worker_reload_failures": (
        "counter",
        "Workers that could not apply a reload in time (each was restarted with it)",
        ("worker",),
    ),
    "backend_up": ("gauge", "1 if the backend is usable for routing", ("backend",)),
    "backend_inflight": ("gauge", "Requests in flight to the backend", ("backend",)),
    "backend_key_share": (
        "gauge",
        "Share of the key space the backend owns on the ring",
        ("backend",),
    ),
    "backend_request_share": (
        "gauge",
        "Share of the requests answered since the previous "
        "scrape that went to the backend (compare with "
        "backend_key_share)",
        ("backend",),
    ),
    "backend_ramp_progress": (
        "gauge",
        "Share of the backend's users returned to it by its failback ramp (1 when not ramping)",
        ("backend",),
    ),
    "hotkeys_tracked": (
        "gauge",
        "User keys held by the hot-key counts (GET /hotkeys), summed over processes",
        (),
    ),
    "ring_info": (
        "gauge",
        "1, labelled with the ring's fingerprint: proxies that route alike "
        "show one fingerprint across a fleet (docs/fleet.md)",
        ("fingerprint",),
    ),
    "ring_members": ("gauge", "Backends on the ring", ()),
    "discovery_rounds": ("counter", "Looks at the discovery source completed", ()),
    "discovery_failures": (
        "counter",
        "Looks at the discovery source that failed (timeout, server error, unreadable file)",
        (),
    ),
    "discovery_refused": (
        "counter",
        "Discovered sets the membership guard refused (empty, "
        "or dropping more than max_drop_share)",
        (),
    ),
    "discovery_applied": ("counter", "Discovered sets applied through the reload path", ()),
    "discovery_refusing": ("gauge", "1 while the latest settled discovered set is refused", ()),
    "resolver_lookups": ("counter", "DNS lookups of backend host names", ()),
    "resolver_failures": ("counter", "DNS lookups of backend host names that failed", ()),
    "resolver_stale_answers": (
        "counter",
        "Connections and checks given an expired address while its lookup was refreshed or failing",
        (),
    ),
    "tls_handshakes": (
        "counter",
        "TLS handshakes with clients, by result (completed, "
        "refused: over listen.tls.max_handshakes, stale: a resumed session "
        "from before the client CA changed)",
        ("result",),
    ),
    "tls_handshakes_in_progress": ("gauge", "Client TLS handshakes begun and not finished", ()),
    "tls_backend_sessions": (
        "counter",
        "TLS connections to backends that offered a saved session, by result (offered, resumed)",
        ("result",),
    ),
    "client_connections": ("gauge", "Open client connections", ()),
    "websocket_tunnels": ("gauge", "Open WebSocket tunnels", ("backend",)),
}


class Tally:
    """One backend's answered requests by status class, counted in native integers since
    metrics were last read (``Observer.current`` folds them into ``Stats``): counting a
    request allocates nothing."""

    __slots__ = ("backend", "labels", "c1", "c2", "c3", "c4", "c5", "other", "aborted")

    def __init__(self, backend: str):
        self.backend = backend
        self.labels = (backend,)  # the latency histogram's labels, made once
        self.c1 = self.c2 = self.c3 = self.c4 = self.c5 = self.other = self.aborted = 0

    def count(self, status: int) -> None:
        if 200 <= status < 300:
            self.c2 += 1
        elif status == 0:
            self.aborted += 1
        elif 400 <= status < 500:
            self.c4 += 1
        elif 500 <= status < 600:
            self.c5 += 1
        elif 300 <= status < 400:
            self.c3 += 1
        elif 100 <= status < 200:
            self.c1 += 1
        else:
            self.other += 1

    def fold(self, requests: dict[tuple, float]) -> None:
        """Add the counts to ``requests`` (the "requests" counter) and start again."""
        b = self.backend
        for cls, n in (
            ("1xx", self.c1),
            ("2xx", self.c2),
            ("3xx", self.c3),
            ("4xx", self.c4),
            ("5xx", self.c5),
            ("other", self.other),
            ("aborted", self.aborted),
        ):
            if n:
                requests[(b, cls)] = requests.get((b, cls), 0) + n
        self.c1 = self.c2 = self.c3 = self.c4 = self.c5 = self.other = self.aborted = 0


class RequestShare:
    """Each backend's share of the requests answered between two reads of the "requests"
    counter (one scrape to the next): the load the ring actually gives it, next to the key
    space it owns. No requests in between: no shares."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def update(self, requests: dict[tuple, float]) -> dict[tuple, float]:
        totals: dict[str, float] = {}
        for labels, n in requests.items():
            bid = labels[0]
            if bid != "none":
                totals[bid] = totals.get(bid, 0.0) + n
        delta = {bid: n - self.last.get(bid, 0.0) for bid, n in totals.items()}
        self.last = totals
        whole = sum(d for d in delta.values() if d > 0)
        if whole <= 0:
            return {}
        return {(bid,): max(d, 0.0) / whole for bid, d in delta.items()}


class Stats:
    """Plain counters for one process. Keys are label-value tuples."""

    __slots__ = ("counters", "hist", "gauges")

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple, float]] = {
            n: {} for n, (k, _, _) in DEFINITIONS.items() if k == "counter"
        }
        # histogram: labels → [bucket counts..., +Inf count, sum]
        self.hist: dict[tuple, list[float]] = {}
        self.gauges: dict[str, dict[tuple, float]] = {
            n: {} for n, (k, _, _) in DEFINITIONS.items() if k == "gauge"
        }

    def inc(self, name: str, labels: tuple = (), by: float = 1) -> None:
        c = self.counters[name]
        c[labels] = c.get(labels, 0) + by

    def observe(self, labels: tuple, seconds: float) -> None:
        h = self.hist.get(labels)
        if h is None:
            h = self.hist[labels] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        h[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def set(self, name: str, labels: tuple, value: float) -> None:
        self.gauges[name][labels] = value

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy (label tuples become lists)."""
        return {
            "counters": {n: [[list(k), v] for k, v in d.items()] for n, d in self.counters.items()},
            "hist": [[list(k), v] for k, v in self.hist.items()],
            "gauges": {n: [[list(k), v] for k, v in d.items()] for n, d in self.gauges.items()},
        }


def merge(snapshots: Iterable[dict[str, Any]], into: Stats | None = None) -> Stats:
    """Sum several workers' snapshots (gauges too: in-flight and connections add up)."""
    out = into or Stats()
    for snap in snapshots:
        for n, rows in snap.get("counters", {}).items():
            if n in out.counters:
                for k, v in rows:
                    out.inc(n, tuple(k), v)
        for k, v in snap.get("hist", []):
            h = out.hist.setdefault(tuple(k), [0.0] * len(v))
            for i, x in enumerate(v):
                h[i] += x
        for n, rows in snap.get("gauges", {}).items():
            if n in out.gauges:
                g = out.gauges[n]
                for k, v in rows:
                    g[tuple(k)] = g.get(tuple(k), 0) + v
    return out


class StatsCollector(Collector):
    """Exports a Stats (fetched fresh from ``source`` at every scrape)."""

    def __init__(self, source: Callable[[], Stats]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        stats: Stats = self.source()
        for name, (kind, help_, labels) in DEFINITIONS.items():
            full = PREFIX + name
            fam: Any
            if kind == "counter":
                fam = CounterMetricFamily(full, help_, labels=list(labels))
                for k, v in sorted(stats.counters[name].items()):
                    fam.add_metric(list(k), v)
            elif kind == "gauge":
                fam = GaugeMetricFamily(full, help_, labels=list(labels))
                for k, v in sorted(stats.gauges[name].items()):
                    fam.add_metric(list(k), v)
            else:
                fam = HistogramMetricFamily(full, help_, labels=list(labels))
                for k, h in sorted(stats.hist.items()):
                    cum = 0.0
                    buckets = []
                    for bound, n in zip(LATENCY_BUCKETS, h):
                        cum += n
                        buckets.append((repr(bound), cum))
                    cum += h[len(LATENCY_BUCKETS)]
                    buckets.append(("+Inf", cum))
                    fam.add_metric(list(k), buckets, h[-1])
            yield fam


def registry_for(source: Callable[[], Stats]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(source))
    return reg


_CLASSES: Final[tuple[str, ...]] = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")


def code_class(status: int) -> str:
    return _CLASSES[status // 100] if 100 <= status < 600 else "other"
