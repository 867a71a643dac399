"""Active and passive health per backend.

The decisions are pure state machines (``ActiveState``, ``PassiveState``, ``may_eject``);
``Health`` is the thin adapter that runs HTTP checks (control/probe.py) and writes the results
onto each ``BackendState`` of the process's ``BackendTable``; it knows nothing of the data
plane (a drained backend's tunnels are closed by the data plane's own timer). Health never rebuilds the ring (DESIGN.md §3): routing skips
unusable backends along each key's preference list.

- Active: GET ``health.path`` every ``interval`` (± ``jitter``); ``fall`` consecutive
  failures mark a backend down, ``rise`` consecutive successes mark it up again.
- Recovery is damped: a backend that comes back up gets its users back only after
  ``failback_delay`` (every proxy applies the same delay, so they converge on the same
  decision instead of each bouncing users as the backend flaps).
- Then, with ``failback_ramp``, they return gradually (routing/ramp.py): the ramp starts
  when the delay ends, and each key returns once the ramp's progress passes the key's
  fixed point, so every proxy whose ramp started at the same instant agrees key by key.
  Under a supervisor, workers take the supervisor's ramp (``ramp_state`` /
  ``follow_ramp``: instants sent as wall-clock times, which processes on one host share,
  and turned back into each process's monotonic clock on receipt).
- Passive: ``consecutive_failures`` failed exchanges in a row (connect errors, resets,
  timeouts, and 5xx when ``on_5xx``) eject the backend for ``base_ejection`` × the number
  of its ejections so far, capped at ``max_ejection``; never more than
  ``max_ejected_percent`` of the backends are ejected at once.
- A refused connect makes routing skip the backend for ``connect_down`` right away, so
  the next requests do not each pay a failed connect.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import tls
from ..config import ConfigError
from ..config import Health as HealthConfig
from ..config import Passive as PassiveConfig
from ..routing.ramp import Ramp
from .probe import ProbeFailed, probe

if TYPE_CHECKING:
    from ..discovery.resolver import HostResolver
    from ..routing.router import BackendState
    from ..routing.table import BackendTable
    from .observe import ControlEvents

log = logging.getLogger("stickyproxy.control.health")


@dataclass
class ActiveState:
    """rise/fall hysteresis (HAProxy's server check model)."""

    up: bool = True
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool, rise: int, fall: int) -> str | None:
        """Count one check; return "up" or "down" when the state flips."""
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.up and self.successes >= rise:
                self.up = True
                return "up"
        else:
            self.successes = 0
            self.failures += 1
            if self.up and self.failures >= fall:
                self.up = False
                return "down"
        return None


@dataclass
class PassiveState:
    """Consecutive-failure outlier detection (Envoy's consecutive_5xx model)."""

    consecutive: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    def record(self, ok: bool, now: float, cfg: PassiveConfig, may_eject: bool) -> float | None:
        """Count one exchange; return the ejection end time when this failure ejects."""
        if ok:
            self.consecutive = 0
            return None
        self.consecutive += 1
        if self.consecutive < cfg.consecutive_failures or now < self.ejected_until:
            return None
        if not may_eject:
            return None
        self.ejections += 1
        self.consecutive = 0
        self.ejected_until = now + ejection_time(self.ejections, cfg)
        return self.ejected_until


def ejection_time(ejections: int, cfg: PassiveConfig) -> float:
    return min(cfg.base_ejection * ejections, cfg.max_ejection)


def may_eject(ejected_now: int, total: int, max_percent: int) -> bool:
    """Whether one more backend may be ejected without exceeding the cap."""
    return total > 0 and (ejected_now + 1) * 100 <= max_percent * total


def check_ok(status: int | None, expect: tuple[int, int]) -> bool:
    return status is not None and expect[0] <= status <= expect[1]


class Health:
    """Runs active checks and applies passive events for one process's backends."""

    def __init__(
        self,
        table: BackendTable,
        observer: ControlEvents,
        *,
        active: bool = True,
        resolver: HostResolver | None = None,
    ):
        self.table = table
        self.resolver = resolver
        self.client_contexts: dict[
            tuple[tls.BackendTLS, str], ssl.SSLContext
        ] = {}  # reloads clear it
        self.observer = observer
        self.run_active = active
        self.active: dict[str, ActiveState] = {}
        self.passive: dict[str, PassiveState] = {}
        self.tracked: dict[str, BackendState] = {}  # the state object each history belongs to
        self.tasks: dict[str, asyncio.Task] = {}

    @property
    def cfg(self) -> HealthConfig:
        return self.table.config.health

    @property
    def pcfg(self) -> PassiveConfig:
        return self.table.config.passive

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.reconfigure()

    def reconfigure(self) -> None:
        """(Re)start checkers to match the current backend set. TLS contexts are made
        again from the files as they are now (a CA or client certificate renewed in place
        is used from the reload on, as by the data plane)."""
        self.client_contexts.clear()
        states = self.table.states
        for bid in list(self.tasks):
            if bid not in states or not (self.run_active and self.cfg.enabled):
                self.tasks.pop(bid).cancel()
        for bid in list(self.active):
            if bid not in states:
                del self.active[bid]
                self.passive.pop(bid, None)
                self.tracked.pop(bid, None)
        for bid, st in states.items():
            if self.tracked.get(bid) is not st:
                # a new backend, or the same id at a new address: its history is not this one's
                self.tracked[bid] = st
                self.active[bid] = ActiveState(up=st.healthy)
                self.passive[bid] = PassiveState()
            if self.run_active and self.cfg.enabled:
                task = self.tasks.get(bid)
                if task is None or task.done():
                    self.tasks[bid] = asyncio.get_running_loop().create_task(self._checker(bid))
            elif not self.cfg.enabled and not st.healthy:
                st.healthy = True  # checks switched off: nothing can mark it down any more

    async def stop(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        for t in list(self.tasks.values()):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self.tasks.clear()

    def _tls_for(self, bid: str) -> tuple[ssl.SSLContext | None, str | None]:
        """The TLS context and server name for checking an https:// backend (the same
        settings as its connections), or (None, None)."""
        try:
            b = self.table.config.backend(bid)
        except KeyError:
            return None, None
        if b.tls is None:
            return None, None
        key = (b.tls, b.protocol)
        ctx = self.client_contexts.get(key)
        if ctx is None:
            ctx = self.client_contexts[key] = tls.client_context(b.tls, alpn=b.protocol)
        return ctx, tls.server_hostname(b.tls, b.host)

    def _speaks_h2(self, bid: str) -> bool:
        try:
            return self.table.config.backend(bid).protocol == "h2"
        except KeyError:
            return False

    async def _checker(self, bid: str) -> None:
        # spread the first checks so N backends are not probed in lockstep
        await asyncio.sleep(random.uniform(0, min(self.cfg.interval, 0.05)))
        while True:
            st = self.table.states.get(bid)
            if st is None:
                return
            cfg = self.cfg
            status: int | None = None
            detail = ""
            try:
                ctx, name = self._tls_for(bid)
                status = await probe(
                    st.host,
                    st.port,
                    cfg.path,
                    cfg.timeout,
                    self.resolver,
                    ctx,
                    name,
                    # a gRPC check is an HTTP/2 call whatever the member says it speaks
                    # (a file-discovered HTTP/1.1 member then fails it, with the reason)
                    http2=cfg.kind == "grpc" or self._speaks_h2(bid),
                    grpc_service=cfg.grpc_service if cfg.kind == "grpc" else None,
                )
            except ProbeFailed as e:
                detail = str(e)
            except ConfigError as e:
                # its TLS files cannot be read now: the check fails, the checker goes on
                detail = "; ".join(e.errors)
            ok = check_ok(status, cfg.expect)
            self.observer.health_check(st, ok)
            self.record_check(bid, ok, status, detail)
            delay = cfg.interval * (1 + random.uniform(-cfg.jitter, cfg.jitter))
            await asyncio.sleep(max(0.001, delay))

    # -- decisions applied to backend state ------------------------------------------------
    def record_check(self, bid: str, ok: bool, status: int | None, detail: str = "") -> None:
        st = self.table.states.get(bid)
        a = self.active.get(bid)
        if st is None or a is None:
            return
        change = a.record(ok, self.cfg.rise, self.cfg.fall)
        if ok and a.up:
            self.check_passed(st)
        if change is None:
            return
        why = f"status {status}" if status is not None else (detail or "no answer")
        self.set_health(
            st,
            change == "up",
            f"{self.cfg.rise if change == 'up' else self.cfg.fall} "
            f"consecutive {'successful' if change == 'up' else 'failed'} checks ({why})",
        )

    def check_passed(self, st: BackendState) -> None:
        """A passing active check lifts a passive ejection and a connect-failure skip
        (Envoy's successful_active_health_check_uneject_host): otherwise a backend that
        failed a few exchanges while restarting stays out of routing for a whole ejection
        time after it is healthy again."""
        now = time.monotonic()
        if st.ejected_until > now or st.connect_down_until > now:
            if st.ejected_until > now:
                log.warning("backend %s: ejection lifted by a passing health check", st.id)
            st.ejected_until = 0.0
            st.connect_down_until = 0.0
            p = self.passive.get(st.id)
            if p is not None:
                p.consecutive = 0
                p.ejected_until = 0.0
            st.passive_clean = True
            self.observer.backend_changed(st)

    def set_health(self, st: BackendState, up: bool, reason: str) -> None:
        """Apply an up/down decision (from a local check or the supervisor)."""
        now = time.monotonic()
        if up == st.healthy:
            return
        st.healthy = up
        st.last_change = now
        st.reason = reason
        a = self.active.get(st.id)
        if a is not None:
            a.up = up
        if up:
            delay, ramp = self.cfg.failback_delay, self.cfg.failback_ramp
            st.failback_until = now + delay if delay else 0.0
            st.ramp = Ramp(now + delay, ramp) if ramp > 0 else None
            log.warning(
                "backend %s is UP: %s%s%s",
                st.id,
                reason,
                f"; its users return after {delay:g}s" if delay else "",
                f"; gradually over {ramp:g}s" if ramp > 0 else "",
            )
        else:
            st.failback_until = 0.0
            st.ramp = None
            log.warning("backend %s is DOWN: %s", st.id, reason)
        self.observer.backend_changed(st)

    @staticmethod
    def ramp_state(
        st: BackendState, now: float, wall: float | None = None
    ) -> dict[str, float] | None:
        """The backend's failback wait and ramp (JSON for workers), or None when its users
        are all back. Times are wall-clock (``time.time()``; ``now`` is the monotonic
        instant it corresponds to): a message that waits in a queue, as the first ones to a
        starting worker do, still means the same instants."""
        ramp = st.ramp
        if st.failback_until <= now and (ramp is None or not ramp.active(now)):
            return None
        wall = time.time() if wall is None else wall
        return {
            "failback_until": wall + (st.failback_until - now) if st.failback_until > now else 0.0,
            "ramp_start": wall + (ramp.start - now) if ramp is not None else 0.0,
            "ramp": ramp.duration if ramp is not None else 0.0,
        }

    def follow_ramp(self, st: BackendState, data: dict[str, float] | None) -> None:
        """Take another process's ``ramp_state`` (None: nobody is waiting to return)."""
        now, wall = time.monotonic(), time.time()
        if not data:
            st.failback_until = 0.0
            st.ramp = None
            return
        until = float(data.get("failback_until", 0.0))
        duration = float(data.get("ramp", 0.0))
        st.failback_until = now + (until - wall) if until > wall else 0.0
        st.ramp = (
            Ramp(now + (float(data.get("ramp_start", wall)) - wall), duration)
            if duration > 0
            else None
        )

    def passive_result(self, st: BackendState, ok: bool) -> None:
        cfg = self.pcfg
        if not cfg.enabled:
            return
        p = self.passive.get(st.id)
        if p is None:
            return
        now = time.monotonic()
        if ok and p.consecutive == 0:
            return
        states = self.table.states.values()
        ejected = sum(1 for s in states if now < s.ejected_until)
        until = p.record(
            ok, now, cfg, may_eject(ejected, len(self.table.states), cfg.max_ejected_percent)
        )
        st.passive_clean = p.consecutive == 0
        if until is not None:
            st.ejected_until = until
            st.ejections = p.ejections
            st.reason = f"{cfg.consecutive_failures} consecutive failures"
            st.last_change = now
            log.warning(
                "backend %s ejected for %.1fs after %d consecutive failures (ejection #%d)",
                st.id,
                until - now,
                cfg.consecutive_failures,
                p.ejections,
            )
            self.observer.ejected(st)

    def connect_failed(self, st: BackendState) -> None:
        d = self.pcfg.connect_down
        if d > 0:
            now = time.monotonic()
            if now >= st.connect_down_until:
                log.info("backend %s refused a connection: skipped for %.1fs", st.id, d)
            st.connect_down_until = now + d

    # -- drain ---------------------------------------------------------------------------
    def drain(self, bid: str, on: bool) -> bool:
        """No new requests to ``bid`` (on) or again (off). In-flight requests finish; its
        WebSocket tunnels get ``timeouts.drain`` (the data plane closes them then)."""
        st = self.table.states.get(bid)
        if st is None:
            return False
        if st.drained == on:
            return True
        now = time.monotonic()
        st.drained = on
        st.drained_since = now if on else 0.0
        st.last_change = now
        log.warning("backend %s %s", bid, "drained: no new requests" if on else "undrained")
        self.observer.backend_changed(st)
        return True
