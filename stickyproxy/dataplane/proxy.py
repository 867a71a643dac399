"""The data-plane server: listener, client connections, timers, config swaps.

One ``Proxy`` per process that serves traffic. It reads the process's ``BackendTable``
(routing/table.py) and keeps one ``Upstream`` per backend in it. Reloading swaps the
routing table atomically: requests already routed keep the router they started with;
backends that stay keep their connections and slots; removed backends' idle connections
are closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, Final

from .. import contract, tls
from ..config import Config, ReadFile, read_disk
from ..discovery.resolver import HostResolver
from ..routing.router import BackendState, Router
from ..routing.table import BackendTable
from .client import REQUEST_WATCH, ClientProtocol, ProxyHeaderProtocol
from .events import Events
from .h2client import AlpnSwitch
from .h2upstream import H2Pool
from .http import FIELD_CACHE_SIZE, FIELD_FORWARD, FIELD_SPECIAL, FIELD_SPECIAL_FORWARD
from .upstream import Upstream

if TYPE_CHECKING:
    from .h2client import H2ClientProtocol
    from .tunnel import Tunnel

log = logging.getLogger("stickyproxy")

# Deadlines are checked on this period: timeouts are enforced to within one tick, and
# a connection costs no timer handle per request.
TICK: Final = 0.1


class Proxy:
    def __init__(
        self,
        table: BackendTable,
        events: Events | None = None,
        resolver: HostResolver | None = None,
        read_file: ReadFile = read_disk,
    ):
        self.events = events or Events()
        self.table = table
        self.upstreams: dict[str, Upstream] = {}
        # upstreams of backends a reload removed that still carry WebSocket tunnels, and
        # when they were removed: drained, not cut (their tunnels get timeouts.drain)
        self.retiring: dict[Upstream, float] = {}
        self.clients: set[ClientProtocol | H2ClientProtocol] = set()
        self.server: asyncio.Server | None = None
        self.stopping = False
        self.active = 0  # exchanges being answered
        self.retrying = 0  # of which have been retried at least once
        self._ticker: asyncio.Task | None = None
        self.backend_headers: dict[str, bytes] = {}
        # backend host names: shared with the health checks (control/process.py); its
        # settings ([resolver]) are read at start-up
        self.resolver = resolver or HostResolver(table.config.resolver)
        self.config = table.config
        self.router: Router = table.router
        # [listen.tls]: one certificate store for the listener's life (reloads swap what it
        # serves; existing connections keep theirs); contexts to TLS backends, one per
        # distinct settings (their session caches make reconnections cheap)
        listen_tls = table.config.listen.tls
        self.tls_store = tls.CertStore(listen_tls, read_file) if listen_tls is not None else None
        self.client_contexts: dict[tuple, ssl.SSLContext] = {}
        self._sync_upstreams(read_file)
        self._set_config(table.config)

    # -- configuration -------------------------------------------------------------------
    def _sync_upstreams(self, read_file: ReadFile) -> None:
        """One ``Upstream`` per backend state in the table: kept while the state is the
        same object (same id and address), else made anew and the old one's idle
        connections closed. Each gets its backend's TLS context (None: plain HTTP)."""
        cfg = self.table.config
        lim, tmo = cfg.limits, cfg.timeouts
        contexts: dict[tuple, ssl.SSLContext] = {}
        ups: dict[str, Upstream] = {}
        for b in cfg.backends:
            st = self.table.states[b.id]
            up = self.upstreams.get(b.id)
            h2 = b.protocol == "h2"
            if up is None or up.state is not st or (up.h2pool is not None) != h2:
                up = Upstream(st, lim.pool_max_idle, lim.pool_max_requests, tmo.upstream_idle)
                if h2:
                    up.h2pool = H2Pool(up)
            else:
                up.configure(lim.pool_max_idle, lim.pool_max_requests, tmo.upstream_idle)
            if b.tls is not None:
                # keyed by the files' bytes too: a CA or client certificate renewed in
                # place is taken by the reload that follows
                ck = tls.context_key(b.tls, b.protocol, read_file)
                ctx = contexts.get(ck) or self.client_contexts.get(ck)
                if ctx is None:
                    ctx = tls.client_context(b.tls, read_file, f"backends[{b.id}].tls", b.protocol)
                contexts[ck] = ctx
                if up.ssl is not ctx:
                    up.close_all()  # connections made with other TLS settings
                up.ssl, up.server_hostname = ctx, tls.server_hostname(b.tls, b.host)
            elif up.ssl is not None:
                up.close_all()
                up.ssl, up.server_hostname = None, None
            ups[b.id] = up
        self.client_contexts = contexts
        now = time.monotonic()
        for bid, up in self.upstreams.items():
            if ups.get(bid) is not up:
                up.close_all()
                if up.tunnels:
                    self.retiring[up] = now
        self.upstreams = ups

    def upstream_for(self, st: BackendState) -> Upstream:
        up = self.upstreams.get(st.id)
        if up is not None and up.state is st:
            return up
        # Routed by a router that a reload has replaced since, to a backend that is gone
        # or moved: a one-off whose connection is not kept (max_idle 0), speaking what the
        # backend of that id speaks now.
        one = Upstream(st, 0, 1, 0.0)
        if up is not None:
            one.ssl, one.server_hostname = up.ssl, up.server_hostname
            if up.h2pool is not None:
                one.h2pool = H2Pool(one)
        return one

    def _set_config(self, config: Config) -> None:
        self.config = config
        hdr = config.headers
        self.header_prefix_lower = hdr.prefix.lower().encode("ascii")
        self.key_header = hdr.key.encode("ascii")
        self.ring_header = b"%s: %s\r\n" % (
            hdr.ring.encode("ascii"),
            self.router.fingerprint.encode("ascii"),
        )
        self.backend_headers = {
            bid: b"%s: %s\r\n" % (hdr.backend.encode("ascii"), bid.encode("ascii"))
            for bid in self.table.states
        }
        route = hdr.route.encode("ascii")
        self.route_headers = {
            True: b"%s: %s\r\n" % (route, contract.ROUTE_PRIMARY.encode("ascii")),
            False: b"%s: %s\r\n" % (route, contract.ROUTE_FAILOVER.encode("ascii")),
        }
        self.default_host = f"{config.listen.host}:{config.listen.port}".encode("ascii")
        self._trusted = config.listen.trusted_proxies
        self.forwarded = hdr.forwarded
        self.allow_underscores = hdr.allow_underscores
        self.request_watch = REQUEST_WATCH | {h.lower().encode("ascii") for h in hdr.strip}
        # the verified client certificate's identity travels in this header (never from
        # a client: a name outside the prefix is stripped like [headers] strip)
        lt = config.listen.tls
        self.identity_kind = lt.identity if lt is not None else "cn"
        self.identity_header = b""
        if lt is not None and lt.client_auth != "none":
            name = tls.identity_header(lt, hdr.prefix)
            self.identity_header = name.encode("ascii") + b": "
            self.request_watch = self.request_watch | {name.lower().encode("ascii")}
        self.request_fields: dict[bytes, tuple[bytes, int, bytes]] = {}
        # read on every request: copied out of the (interpreted) config objects once
        self.access_log = config.logging.access != "off"
        self.response_timeout = config.timeouts.response
        self.body_idle = config.timeouts.body_idle
        self.client_header_timeout = config.timeouts.client_header
        self.max_inflight = config.limits.max_inflight_per_backend

    def request_field(self, name: bytes) -> tuple[bytes, int, bytes]:
        """How a request field spelled ``name`` is handled: (its lower-cased name, one of
        http.FIELD_*, ``name + b": "``), remembered in ``request_fields`` (bounded)."""
        fields = self.request_fields
        info = fields.get(name)
        if info is not None:
            return info
        ln = name.lower()
        if (
            ln in self.request_watch
            or ln.startswith(self.header_prefix_lower)
            or (not self.allow_underscores and ln.find(b"_") >= 0)
        ):
            kind = FIELD_SPECIAL_FORWARD if ln == b"host" else FIELD_SPECIAL
        else:
            kind = FIELD_FORWARD
        info = (ln, kind, name + b": ")
        if len(fields) >= FIELD_CACHE_SIZE:
            fields.clear()
        fields[name] = info
        return info

    def apply(self, read_file: ReadFile = read_disk) -> None:
        """Follow the table after ``BackendTable.apply`` swapped in a configuration;
        certificate and key files are read with ``read_file`` (the reload's pinned copies).
        A listener that must be made anew (``tls.needs_new_listener``) is the caller's to
        rebind first."""
        new_tls = self.table.config.listen.tls
        if new_tls is not None and self.tls_store is not None:
            result = self.tls_store.apply(new_tls, read_file)
            if result.errors:  # resolve() loaded the same bytes: only a bug gets here
                raise ValueError("; ".join(result.errors))
        self.router = self.table.router
        self._sync_upstreams(read_file)
        self._set_config(self.table.config)

    # -- what the control plane reads and asks of the data plane --------------------------
    def tls_counts(self, stats: Any) -> None:
        """Copy the TLS counters (the listener's handshake gate, the backend session
        caches) into a metrics ``Stats``; they are the gate's and caches' own totals."""
        if self.tls_store is not None:
            gate = self.tls_store.gate
            c = stats.counters["tls_handshakes"]
            c[("completed",)], c[("refused",)], c[("stale",)] = (
                gate.completed,
                gate.refused,
                gate.stale,
            )
            stats.gauges["tls_handshakes_in_progress"] = {(): float(gate.in_progress)}
        if self.client_contexts:
            caches = [tls.session_cache(ctx) for ctx in self.client_contexts.values()]
            c = stats.counters["tls_backend_sessions"]
            c[("offered",)] = sum(x.offered for x in caches if x is not None)
            c[("resumed",)] = sum(x.resumed for x in caches if x is not None)

    def inflight(self) -> dict[str, int]:
        return {bid: up.inflight for bid, up in self.upstreams.items()}

    def tunnels(self) -> dict[str, int]:
        return {bid: len(up.tunnels) for bid, up in self.upstreams.items()}

    # -- hooks used by the protocols -----------------------------------------------------
    def client_identity(self, ssl_object: Any) -> str | None:
        """The verified client certificate's identity on a TLS connection, or None."""
        if not self.identity_header:
            return None
        return tls.client_identity(ssl_object, self.identity_kind)

    def is_trusted(self, ip: str | None) -> bool:
        if not ip or not self._trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)

    def client_opened(self, client: ClientProtocol | H2ClientProtocol) -> bool:
        if len(self.clients) >= self.config.limits.max_client_connections or self.stopping:
            self.events.request_rejected(503)
            return False
        self.clients.add(client)
        self.events.client_opened()
        return True

    def client_closed(self, client: ClientProtocol | H2ClientProtocol) -> None:
        if client in self.clients:
            self.clients.discard(client)
            self.events.client_closed()

    def retry_allowed(self) -> bool:
        """Retry budget: concurrent retries stay under a share of active requests."""
        r = self.config.retries
        budget = max(r.budget_min, self.active * r.budget_percent // 100)
        return self.retrying < budget

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        self.events.tunnel_closed(tunnel.slot.state)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        reuse_port: bool = False,
        sock=None,
    ) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(
                self._protocol, sock=sock, backlog=1024, **self._tls_args()
            )
        else:
            self.server = await loop.create_server(
                self._protocol,
                host if host is not None else self.config.listen.host,
                port if port is not None else self.config.listen.port,
                reuse_port=reuse_port or None,
                backlog=1024,
                **self._tls_args(),
            )
        self._ticker = loop.create_task(self._tick())
        # a request without Host (HTTP/1.0) is forwarded with the address it came in on
        self.default_host = f"{self.config.listen.host}:{self.port}".encode("ascii")

    def _protocol(self) -> asyncio.Protocol:
        """A new connection's protocol: HTTP/1.1 at once, or the PROXY header first."""
        if self.config.listen.proxy_protocol:
            return ProxyHeaderProtocol(self)
        store = self.tls_store
        if store is not None and "h2" in store.settings.alpn:
            return AlpnSwitch(self)  # HTTP/2 or HTTP/1.1, once ALPN has chosen
        return ClientProtocol(self)

    def _tls_args(self) -> dict[str, Any]:
        store = self.tls_store
        if store is None:
            return {}
        return {
            "ssl": store.context,
            "ssl_handshake_timeout": store.settings.handshake_timeout,
            "ssl_shutdown_timeout": tls.SHUTDOWN_TIMEOUT,
        }

    async def rebind(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        listen_tls: tls.ListenTLS | None = None,
        read_file: ReadFile = read_disk,
    ) -> None:
        """Listen anew (another address, or TLS switched on, off or given a new handshake
        timeout: ``listen_tls``); connections accepted on the old listener carry on.
        OSError when the new one cannot listen, and then nothing changed."""
        loop = asyncio.get_running_loop()
        old_store = self.tls_store
        if listen_tls is None:
            self.tls_store = None
        elif old_store is None or tls.needs_new_listener(old_store.settings, listen_tls):
            self.tls_store = tls.CertStore(listen_tls, read_file)
        try:
            new = await loop.create_server(
                self._protocol,
                host,
                port,
                reuse_port=reuse_port or None,
                backlog=1024,
                **self._tls_args(),
            )
        except OSError:
            self.tls_store = old_store
            raise
        old, self.server = self.server, new
        if old is not None:
            old.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        # uvloop's Server.sockets is a list where typeshed says tuple: read it untyped, so
        # the compiled build does not enforce the stub's type
        sockets: Any = getattr(self.server, "sockets")  # noqa: B009
        return sockets[0].getsockname()[1]

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for c in list(self.clients):
                try:
                    c.on_tick(now)
                except Exception:  # a bug in one connection must not stop every timer
                    log.exception("timer handling failed for a client connection")
                    c._close(abort=True)
            grace = self.config.timeouts.drain
            for up in self.upstreams.values():
                up.sweep(now)
                st = up.state
                if up.tunnels and st.drained and now - st.drained_since >= grace:
                    log.warning(
                        "backend %s: closing %d WebSocket tunnels after drain timeout",
                        up.id,
                        up.close_tunnels(),
                    )
            for up, since in list(self.retiring.items()):
                if up.tunnels and now - since >= grace:
                    log.warning(
                        "backend %s (removed): closing %d WebSocket tunnels after drain timeout",
                        up.id,
                        up.close_tunnels(),
                    )
                if not up.tunnels:
                    del self.retiring[up]

    async def stop(self, grace: float | None = None) -> int:
        """Stop accepting; let in-flight requests finish up to ``grace``; then close all.
        Returns how many client connections were still open at the deadline (cut)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for c in list(self.clients):
            c.shutdown()
        grace = self.config.timeouts.shutdown if grace is None else grace
        deadline = time.monotonic() + grace
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            for c in list(self.clients):
                c.shutdown()
        cut = len(self.clients)
        for c in list(self.clients):
            c._close(abort=True)
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        for up in self.upstreams.values():
            up.close_all()
        for up in self.retiring:
            up.close_tunnels()
        await self.resolver.close()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except TimeoutError:
                pass
        return cut
