"""The routing decision: ring + key extraction + the usable state of each backend.

A ``Router`` is immutable once built (a reload builds a new one and swaps it in); the
per-backend ``BackendState`` objects it points to belong to the ``BackendTable``
(routing/table.py), which keeps them across reloads for backends that stay, so health,
ejection and drain decisions survive a reload. What the data plane keeps per backend
(connections, in-flight slots, tunnels) is its own (dataplane/upstream.py ``Upstream``).

A backend with a ``ramp`` (routing/ramp.py: it recovered, or joined by a reload, a moment
ago) is usable for a key only once that key has returned to it, as the key's owner and as a
failover target alike; a key that has not returned stays where it was (the next usable
backend on its preference list). With no ramp anywhere the only cost is reading the
owner's ``ramp`` (None). A ramp that has ended is dropped by the first route that meets it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Collection, Iterator

from ..config import Backend, Config
from .hotkeys import Recent
from .keys import KeyExtractor
from .ramp import Ramp, key_point
from .ring import Member, Ring
from .spill import percent


class BackendState:
    """What routing knows of one backend: whether it may be chosen, and why not. Routing
    reads ``usable``; the health code (control/health.py) and the operator's drain write
    the rest; the data plane never writes here."""

    __slots__ = (
        "id",
        "host",
        "port",
        "weight",
        "address",
        "drained",
        "drained_since",
        "healthy",
        "ejected_until",
        "connect_down_until",
        "failback_until",
        "ejections",
        "last_change",
        "reason",
        "passive_clean",
        "ramp",
        "__weakref__",
    )

    def __init__(self, backend: Backend):
        self.id = backend.id
        self.host = backend.host
        self.port = backend.port
        self.weight = backend.weight
        self.address = backend.address
        self.drained = False
        self.drained_since = 0.0  # monotonic time of the drain (its tunnels' grace)
        self.healthy = True  # active checks: starts up (HAProxy's default)
        self.ejected_until = 0.0  # passive ejection
        self.connect_down_until = 0.0  # a refused connect: skip for a short while
        self.failback_until = 0.0  # recovered, but users stay on their fallback until then
        self.ejections = 0
        self.last_change = 0.0
        self.reason = "initial"
        # no passive failure counted since the last success: another success changes
        # nothing, so the data plane skips the health code (kept by Health.passive_result)
        self.passive_clean = True
        # its users return gradually (from failback_until on); None: not ramping
        self.ramp: Ramp | None = None

    def ramping(self, now: float) -> bool:
        """Some of its users have not returned yet (the ramp may not have started)."""
        ramp = self.ramp
        return ramp is not None and ramp.active(now)

    def usable(self, now: float) -> bool:
        return (
            self.healthy
            and not self.drained
            and now >= self.ejected_until
            and now >= self.connect_down_until
            and now >= self.failback_until
        )

    def state(self, now: float) -> str:
        if self.drained:
            return "drained"
        if not self.healthy:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        if now < self.connect_down_until:
            return "connect-failed"
        if now < self.failback_until:
            return "failback-wait"
        if self.ramping(now):
            return "ramping"
        return "up"


class Route:
    """Where one request goes. A plain class, not a NamedTuple: compiled, it is built
    without a call into the interpreter on every request."""

    __slots__ = ("backend", "kind", "owner")

    def __init__(self, backend: BackendState | None, kind: str, owner: str | None):
        self.backend = backend
        # "primary" | "failover" | "no_key" | "panic" | "none"; bounded load may then
        # move the exchange, whose route becomes "spill" (dataplane/exchange.py)
        self.kind = kind
        self.owner = owner

    def __repr__(self) -> str:
        return f"Route({self.backend!r}, {self.kind!r}, {self.owner!r})"


def has_returned(b: BackendState, key: str, now: float) -> bool:
    """Whether ``key`` may be routed to ``b`` as far as its ramp goes (no ramp: yes). A
    ramp found ended is dropped."""
    ramp = b.ramp
    if ramp is None:
        return True
    if not ramp.active(now):
        b.ramp = None
        return True
    return ramp.returned(key_point(key), now)


class Router:
    __slots__ = (
        "config",
        "ring",
        "extractor",
        "fingerprint",
        "backends",
        "ordered",
        "_rr",
        "panic_threshold",
        "balance_pct",
        "hotkeys",
        "_hot_left",
    )

    def __init__(
        self, config: Config, states: dict[str, BackendState], hotkeys: Recent | None = None
    ):
        self.config = config
        self.ring = Ring([Member(b.id, b.weight) for b in config.backends], config.routing.vnodes)
        self.fingerprint = self.ring.fingerprint
        self.extractor = KeyExtractor(config.routing.keys, config.routing.max_key_length)
        self.backends: dict[str, BackendState] = {b.id: states[b.id] for b in config.backends}
        self.ordered = [self.backends[m.id] for m in self.ring.members]
        self._rr = itertools.count()
        self.panic_threshold = config.health.panic_threshold
        # routing.balance_factor as a whole percentage; 0: bounded load is off
        factor = config.routing.balance_factor
        self.balance_pct = percent(factor) if factor else 0
        # the process's hot-key counts, fed by the data plane (None: off); the sampling
        # countdown lives here, a native int when compiled, so that the request path calls
        # into the (interpreted) sketch only for the requests it samples
        self.hotkeys = hotkeys
        self._hot_left = hotkeys.sample_every if hotkeys is not None else 0

    def in_panic(self, now: float) -> bool:
        """Fewer than panic_threshold % of backends usable: route by the plain ring."""
        if not self.ordered or self.panic_threshold <= 0:
            return False
        usable = sum(1 for b in self.ordered if b.usable(now))
        return usable * 100 < self.panic_threshold * len(self.ordered)

    def route(self, key: str, now: float) -> Route:
        """The backend for a user key; the hot path is one ring lookup."""
        owner = self.ring.owner(key)
        if owner is None:
            return Route(None, "none", None)
        b = self.backends[owner]
        if b.usable(now):
            if b.ramp is None or has_returned(b, key, now):
                return Route(b, "primary", owner)
        elif self.in_panic(now):
            # Route by the plain ring, except off a backend an operator drained.
            for bid in self.ring.preference(key):
                cand = self.backends[bid]
                if not cand.drained:
                    return Route(cand, "panic", owner)
            return Route(None, "none", owner)
        waiting: BackendState | None = None
        for bid in self.ring.preference(key):
            cand = self.backends[bid]
            if cand.usable(now):
                if cand.ramp is None or has_returned(cand, key, now):
                    return Route(cand, "failover", owner)
                if waiting is None:
                    waiting = cand
        if waiting is not None:
            # only ramping backends the key has not returned to are usable: better early
            # than refused
            return Route(waiting, "primary" if waiting.id == owner else "failover", owner)
        return Route(None, "none", owner)

    def count_key(self, key: str, now: float) -> None:
        """Offer a routed request's key to the hot-key counts (one in ``sample_every``)."""
        n = self._hot_left - 1
        if n > 0:
            self._hot_left = n
            return
        hot = self.hotkeys
        if hot is not None:
            self._hot_left = hot.sample_every
            hot.sampled(key, now)

    def return_time(self, b: BackendState, key: str) -> float | None:
        """When ``key`` returns to ``b`` (the ramp's clock), None when ``b`` is not ramping."""
        ramp = b.ramp
        return None if ramp is None else ramp.return_time(key_point(key))

    def spill_order(self, key: str, first: BackendState, now: float) -> list[BackendState]:
        """Bounded load's candidates for ``key``: ``first`` (where the key was routed), then
        every other usable backend in the key's preference order that the key may use (a
        ramping backend only once the key has returned to it)."""
        out = [first]
        for bid in self.ring.preference(key):
            cand = self.backends[bid]
            if (
                cand is not first
                and cand.usable(now)
                and (cand.ramp is None or has_returned(cand, key, now))
            ):
                out.append(cand)
        return out

    def route_keyless(self, client_ip: str | None, now: float) -> Route:
        policy = self.config.routing.no_key
        if policy == "client-ip" and client_ip:
            r = self.route(client_ip, now)
            return Route(r.backend, "no_key" if r.backend else "none", r.owner)
        n = len(self.ordered)
        if n == 0:
            return Route(None, "none", None)
        start = next(self._rr)
        for i in range(n):
            b = self.ordered[(start + i) % n]
            if b.usable(now):
                return Route(b, "no_key", None)
        return Route(None, "none", None)

    def alternatives(
        self, key: str | None, tried: Collection[str], now: float
    ) -> Iterator[BackendState]:
        """Backends to retry on, in the key's preference order (P3), skipping tried ones;
        ramping backends the key has not returned to come last."""
        ids = self.ring.preference(key) if key is not None else [b.id for b in self.ordered]
        later: list[BackendState] = []
        for bid in ids:
            b = self.backends[bid]
            if bid not in tried and b.usable(now):
                if key is None or b.ramp is None or has_returned(b, key, now):
                    yield b
                else:
                    later.append(b)
        yield from later


def key_digest(key: str) -> str:
    """A short, non-reversible tag of a user key for logs (the raw key only when configured)."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=6).hexdigest()
