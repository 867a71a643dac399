"""Where events become metrics, log lines and health decisions.

``ControlEvents``: what health checks, drains and reloads report (every process has one,
the supervisor included). ``Observer``: the data plane's event sink (metrics, access log,
passive health), in processes that serve traffic. Both count into one ``Stats``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..dataplane.events import Events
from ..routing.router import key_digest
from .logs import access_record, format_access
from .metrics import RequestShare, Stats, Tally, code_class

if TYPE_CHECKING:
    from ..dataplane.exchange import Exchange
    from ..discovery.resolver import ResolverStats
    from ..discovery.source import DiscoveryStats
    from ..routing.router import BackendState
    from ..routing.table import BackendTable
    from .health import Health

access_log = logging.getLogger("stickyproxy.access")
log = logging.getLogger("stickyproxy")

# Panic mode is logged at most this often (seconds); every panic decision is counted.
PANIC_LOG_INTERVAL: Final = 10.0


class ControlEvents:
    """Health, drain and reload events of one process, and the gauges read off its table."""

    def __init__(self, table: BackendTable, stats: Stats | None = None):
        self.table = table
        self.stats = stats or Stats()
        self.request_share = RequestShare()
        # hooks for a supervisor that tells its workers (set, never subclassed: the
        # compiled class cannot be patched or subclassed from interpreted code)
        self.on_health_check: Callable[[BackendState, bool], None] | None = None
        self.on_backend_changed: Callable[[BackendState], None] | None = None
        # the discovery source's and host resolver's counts, read when metrics are
        self.discovery: DiscoveryStats | None = None
        self.resolver: ResolverStats | None = None

    def health_check(self, st: BackendState, ok: bool) -> None:
        self.stats.inc("health_checks", (st.id, "success" if ok else "failure"))
        if self.on_health_check is not None:
            self.on_health_check(st, ok)

    def backend_changed(self, st: BackendState) -> None:
        if self.on_backend_changed is not None:
            self.on_backend_changed(st)

    def ejected(self, st: BackendState) -> None:
        self.stats.inc("ejections", (st.id,))

    def reloaded(self, ok: bool, ring_changed: bool = False) -> None:
        self.stats.inc("reloads", ("success" if ok else "failure",))
        if ring_changed:
            self.stats.inc("ring_changes")

    def worker_reload_failed(self, worker: int) -> None:
        self.stats.inc("worker_reload_failures", (str(worker),))

    def current(self, *, shares: bool = True) -> Stats:
        """Counters as recorded, plus the gauges read from the table."""
        table = self.table
        now = time.monotonic()
        g = self.stats.gauges
        g["backend_up"] = {
            (bid,): 1.0 if st.usable(now) else 0.0 for bid, st in table.states.items()
        }
        g["backend_ramp_progress"] = {(bid,): p for bid, p in table.ramps(now).items()}
        hot = table.hotkeys
        g["hotkeys_tracked"] = {(): float(len(hot) if hot is not None else 0)}
        g["ring_info"] = {(table.router.fingerprint,): 1.0}
        g["ring_members"] = {(): float(len(table.states))}
        c = self.stats.counters
        d = self.discovery
        if d is not None:
            # the source's own monotonic counts, copied (not added) at each read
            for name, n in (
                ("discovery_rounds", d.rounds),
                ("discovery_failures", d.failures),
                ("discovery_refused", d.refused),
                ("discovery_applied", d.applied),
            ):
                c[name][()] = n
            g["discovery_refusing"] = {(): 1.0 if d.refusing else 0.0}
        r = self.resolver
        if r is not None:
            c["resolver_lookups"][()] = r.lookups
            c["resolver_failures"][()] = r.failures
            c["resolver_stale_answers"][()] = r.stale
        if shares:
            g["backend_key_share"] = {(bid,): s for bid, s in table.router.ring.key_share().items()}
            g["backend_request_share"] = self.request_share.update(self.stats.counters["requests"])
        return self.stats


class Observer(Events):
    def __init__(self, control: ControlEvents, health: Health | None):
        self.control = control
        self.stats = control.stats
        self.health = health
        self.clients = 0
        self.tunnels: dict[str, int] = {}
        self.metrics_enabled = True
        # requests counted natively since metrics were last read (see current())
        self.tallies: dict[str, Tally] = {}
        self.routed_primary = 0
        self.routed_failover = 0
        self.panic_logged = -PANIC_LOG_INTERVAL

    # -- data plane events ---------------------------------------------------------------
    def connect_failed(self, backend: BackendState, kind: str) -> None:
        if self.health is not None:
            self.health.connect_failed(backend)

    def upstream_error(self, backend: BackendState, kind: str, blame: bool = True) -> None:
        self.stats.inc("upstream_errors", (backend.id, kind))
        if blame and self.health is not None:
            self.health.passive_result(backend, False)

    def upstream_ok(self, backend: BackendState, status: int) -> None:
        if status < 500 and backend.passive_clean:
            return  # a success after a success: nothing for passive health to count
        h = self.health
        if h is not None:
            h.passive_result(backend, not (status >= 500 and h.pcfg.on_5xx))

    def retry(self, backend: BackendState, reason: str) -> None:
        self.stats.inc("retries", (backend.id, reason))

    def retry_denied(self, backend: BackendState, reason: str) -> None:
        self.stats.inc("retries_denied", (backend.id, reason))

    def request_rejected(self, status: int) -> None:
        self.stats.inc("rejected_requests", (str(status),))

    def request_done(self, ex: Exchange) -> None:
        if not self.metrics_enabled:
            return
        now = time.monotonic()
        b = ex.backend
        bid = b.id if b is not None else "none"
        status = ex.status or 0
        stats = self.stats
        slot = ex.slot
        if b is not None and slot is not None:
            t = slot.tally
            if t is None:
                t = slot.tally = self._tally(bid)
            t.count(status)
            stats.observe(t.labels, now - ex.started)
        else:
            c = stats.counters["requests"]
            k = (bid, code_class(status) if status else "aborted")
            c[k] = c.get(k, 0) + 1
        route = ex.route
        if route == "primary":
            self.routed_primary += 1
        elif route == "failover":
            self.routed_failover += 1
        elif route:
            r = stats.counters["route_decisions"]
            rk = (route if route != "none" else "unavailable",)
            r[rk] = r.get(rk, 0) + 1
            if route == "spill":
                stats.inc("spills", (ex.spilled_from,))
            if route == "panic" and now - self.panic_logged > PANIC_LOG_INTERVAL:
                self.panic_logged = now
                log.warning(
                    "panic mode: fewer than %d%% of backends usable; routing by the plain ring",
                    ex.server.config.health.panic_threshold,
                )
        if ex.server.access_log:
            cfg = ex.server.config.logging
            key = ex.key
            if key is not None and cfg.access_key != "raw":
                key = key_digest(key) if cfg.access_key == "hash" else None
            rec = access_record(
                client=ex.client.peer_ip,
                method=ex.method,
                path=ex.target.decode("latin-1"),
                status=status,
                sent=ex.resp_bytes,
                duration=now - ex.started,
                backend=None if b is None else bid,
                route=ex.route,
                retries=ex.retries,
                key=key,
            )
            access_log.info(format_access(rec, cfg.access))

    def client_opened(self) -> None:
        self.clients += 1

    def client_closed(self) -> None:
        self.clients -= 1

    def tunnel_opened(self, backend: BackendState) -> None:
        self.tunnels[backend.id] = self.tunnels.get(backend.id, 0) + 1

    def tunnel_closed(self, backend: BackendState) -> None:
        self.tunnels[backend.id] = self.tunnels.get(backend.id, 1) - 1

    # -- export --------------------------------------------------------------------------
    def _tally(self, backend: str) -> Tally:
        # one per backend id, kept across reloads that re-create its state
        t = self.tallies.get(backend)
        if t is None:
            t = self.tallies[backend] = Tally(backend)
        return t

    def fold(self) -> None:
        """Move the natively counted requests and routing decisions into ``stats``."""
        counters = self.stats.counters
        requests = counters["requests"]
        for t in self.tallies.values():
            t.fold(requests)
        routes = counters["route_decisions"]
        for kind, n in (("primary", self.routed_primary), ("failover", self.routed_failover)):
            if n:
                routes[(kind,)] = routes.get((kind,), 0) + n
        self.routed_primary = self.routed_failover = 0

    def current(
        self,
        inflight: dict[str, int],
        *,
        shares: bool = True,
        extra: Callable[[Stats], None] | None = None,
    ) -> Stats:
        """Counters as recorded, plus gauges read from the live state (``inflight``: the
        data plane's per-backend in-flight counts; ``extra`` writes what the data plane
        counts itself, e.g. Proxy.tls_counts)."""
        self.fold()
        stats = self.control.current(shares=shares)
        if extra is not None:
            extra(stats)
        g = stats.gauges
        g["client_connections"] = {(): float(self.clients)}
        g["websocket_tunnels"] = {(k,): float(v) for k, v in self.tunnels.items()}
        g["backend_inflight"] = {(bid,): float(n) for bid, n in inflight.items()}
        return stats

    def snapshot(
        self, inflight: dict[str, int], extra: Callable[[Stats], None] | None = None
    ) -> dict[str, Any]:
        return self.current(inflight, shares=False, extra=extra).snapshot()
