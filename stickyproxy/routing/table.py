"""The backend table: the configuration, the routing decision and every backend's state,
owned in one place.

A process holds one ``BackendTable``: the single-process proxy, each worker and the
supervisor alike. Health checks, drains, metrics views and the admin API read and write it;
the data plane reads it and subscribes to what changes (``apply`` returns the difference).
Invariants:

- ``router`` is rebuilt on every ``apply`` and replaced whole; a request routed by the old
  one keeps it (it holds the same ``BackendState`` objects).
- A backend keeps its ``BackendState`` across a reload while its id and address stay;
  the same id at a new address is a new backend (its health history was another host's),
  except for the drain, which is the operator's decision about the id.
- A backend that a reload adds (or readdresses) while ``health.failback_ramp`` is set gets
  a ramp starting at the reload (slow start): its users return to it gradually. The
  backends of the first configuration do not: there is no fallback to keep users on.
- ``hotkeys`` (the process's hot-key counts) outlives reloads unless its settings change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import Config
from .hotkeys import Recent
from .ramp import Ramp
from .router import BackendState, Router


@dataclass(frozen=True)
class TableDiff:
    """What one ``apply`` changed, by backend id."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    readdressed: tuple[str, ...] = ()  # same id, new address: a new backend state
    reweighted: tuple[str, ...] = ()
    ring_before: str = ""
    ring_after: str = ""

    @property
    def ring_changed(self) -> bool:
        return self.ring_before != self.ring_after


class BackendTable:
    __slots__ = ("config", "router", "states", "hotkeys")

    def __init__(self, config: Config):
        self.states: dict[str, BackendState] = {}
        self.config = config
        self.hotkeys: Recent | None = None
        self.router = self._build(config)[0]

    def _hotkeys(self, config: Config, now: float) -> Recent | None:
        hk = config.hotkeys
        if not hk.enabled:
            return None
        raw = config.logging.access_key == "raw"
        old = self.hotkeys
        if old is not None and old.same_settings(hk.max_keys, hk.sample_every, raw, hk.window):
            return old
        return Recent(hk.max_keys, hk.sample_every, raw, hk.window, now)

    def _build(self, config: Config) -> tuple[Router, TableDiff]:
        now = time.monotonic()
        ramp = config.health.failback_ramp
        old = self.states
        states: dict[str, BackendState] = {}
        added, readdressed, reweighted = [], [], []
        for b in config.backends:
            st = old.get(b.id)
            if st is None or st.address != b.address:
                fresh = BackendState(b)
                fresh.last_change = now
                if old and ramp > 0:
                    fresh.ramp = Ramp(now, ramp)
                    fresh.reason = "added: slow start"
                if st is not None:
                    fresh.drained, fresh.drained_since = st.drained, st.drained_since
                    readdressed.append(b.id)
                else:
                    added.append(b.id)
                states[b.id] = fresh
            else:
                if st.weight != b.weight:
                    st.weight = b.weight
                    reweighted.append(b.id)
                states[b.id] = st
        removed = tuple(bid for bid in old if bid not in states)
        before = self.router.fingerprint if old else ""
        self.states = states
        self.hotkeys = self._hotkeys(config, now)
        router = Router(config, states, self.hotkeys)
        return router, TableDiff(
            tuple(added), removed, tuple(readdressed), tuple(reweighted), before, router.fingerprint
        )

    def apply(self, config: Config) -> TableDiff:
        """Swap in a validated configuration; returns what changed."""
        router, diff = self._build(config)
        self.config = config
        self.router = router
        return diff

    def ramps(self, now: float) -> dict[str, float]:
        """Progress (0..1) of every backend's ramp, 1.0 for one not ramping."""
        return {
            bid: st.ramp.progress(now) if st.ramp is not None else 1.0
            for bid, st in self.states.items()
        }

    def any_usable(self, now: float) -> bool:
        return any(st.usable(now) for st in self.states.values())
