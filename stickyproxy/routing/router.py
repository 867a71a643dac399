"""The routing decision: ring + key extraction + the usable state of each backend.

A ``Router`` is immutable once built (a reload builds a new one and swaps it in); the
per-backend ``BackendState`` objects it points to belong to the ``BackendTable``
(routing/table.py), which keeps them across reloads for backends that stay, so health,
ejection and drain decisions survive a reload. What the data plane keeps per backend
(connections, in-flight slots, tunnels) is its own (dataplane/upstream.py ``Upstream``).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Collection, Iterator

from ..config import Backend, Config
from .keys import KeyExtractor
from .ring import Member, Ring


class BackendState:
    """What routing knows of one backend: whether it may be chosen, and why not. Routing
    reads ``usable``; the health code (control/health.py) and the operator's drain write
    the rest; the data plane never writes here."""

    __slots__ = ("id", "host", "port", "weight", "address", "drained", "drained_since",
                 "healthy", "ejected_until", "connect_down_until", "failback_until",
                 "ejections", "last_change", "reason",
                 "passive_clean", "__weakref__")

    def __init__(self, backend: Backend):
        self.id = backend.id
        self.host = backend.host
        self.port = backend.port
        self.weight = backend.weight
        self.address = backend.address
        self.drained = False
        self.drained_since = 0.0      # monotonic time of the drain (its tunnels' grace)
        self.healthy = True           # active checks: starts up (HAProxy's default)
        self.ejected_until = 0.0      # passive ejection
        self.connect_down_until = 0.0 # a refused connect: skip for a short while
        self.failback_until = 0.0     # recovered, but users stay on their fallback until then
        self.ejections = 0
        self.last_change = 0.0
        self.reason = "initial"
        # no passive failure counted since the last success: another success changes
        # nothing, so the data plane skips the health code (kept by Health.passive_result)
        self.passive_clean = True

    def usable(self, now: float) -> bool:
        return (self.healthy and not self.drained and now >= self.ejected_until
                and now >= self.connect_down_until and now >= self.failback_until)

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
        return "up"


class Route:
    """Where one request goes. A plain class, not a NamedTuple: compiled, it is built
    without a call into the interpreter on every request."""

    __slots__ = ("backend", "kind", "owner")

    def __init__(self, backend: BackendState | None, kind: str, owner: str | None):
        self.backend = backend
        self.kind = kind     # "primary" | "failover" | "no_key" | "panic" | "none"
        self.owner = owner

    def __repr__(self) -> str:
        return f"Route({self.backend!r}, {self.kind!r}, {self.owner!r})"


class Router:
    __slots__ = ("config", "ring", "extractor", "fingerprint", "backends", "ordered",
                 "_rr", "panic_threshold")

    def __init__(self, config: Config, states: dict[str, BackendState]):
        self.config = config
        self.ring = Ring([Member(b.id, b.weight) for b in config.backends], config.routing.vnodes)
        self.fingerprint = self.ring.fingerprint
        self.extractor = KeyExtractor(config.routing.keys, config.routing.max_key_length)
        self.backends: dict[str, BackendState] = {b.id: states[b.id] for b in config.backends}
        self.ordered = [self.backends[m.id] for m in self.ring.members]
        self._rr = itertools.count()
        self.panic_threshold = config.health.panic_threshold

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
            return Route(b, "primary", owner)
        if self.in_panic(now):
            # Route by the plain ring, except off a backend an operator drained.
            for bid in self.ring.preference(key):
                cand = self.backends[bid]
                if not cand.drained:
                    return Route(cand, "panic", owner)
            return Route(None, "none", owner)
        for bid in self.ring.preference(key):
            cand = self.backends[bid]
            if cand.usable(now):
                return Route(cand, "failover", owner)
        return Route(None, "none", owner)

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

    def alternatives(self, key: str | None, tried: Collection[str], now: float) -> Iterator[BackendState]:
        """Backends to retry on, in the key's preference order (P3), skipping tried ones."""
        ids = self.ring.preference(key) if key is not None else [b.id for b in self.ordered]
        for bid in ids:
            b = self.backends[bid]
            if bid not in tried and b.usable(now):
                yield b


def key_digest(key: str) -> str:
    """A short, non-reversible tag of a user key for logs (the raw key only when configured)."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=6).hexdigest()
