"""A guarded per-user cache at the owner, in front of a slow origin (a database, an HTTP API):
local and bounded, invalidated per user, with a circuit breaker and request coalescing so
that an origin outage or a cold start does not turn into a self-made flood.

Invariants:
* At most one origin load per (user, key) is in flight on this instance; every other caller
  of that key waits for it (coalescing), and a waiter's cancellation never cancels the load.
* With a store, an entry is served only under the ownership epoch it was loaded in
  (``ContextStore.epoch_of``): any acquire or delete of the user, on any instance, makes
  every older entry of that user a miss, so a user who moved away and back never sees an
  entry from before the move. Without a store the only bound is ``ttl``.
* An entry is fresh for ``ttl``; past it, and for ``stale_if_error`` more, it is served only
  when the origin fails or the breaker is open (RFC 5861 §4 semantics), never otherwise.
* While the breaker is open no load reaches the origin; one probe is let through after
  ``breaker_reset``.
* Entries are bounded by ``max_entries`` in all (least recently used evicted first).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from .breaker import BreakerState, CircuitBreaker
from .errors import ConfigError, ContextError
from .metrics import CacheMetrics
from .settings import parse_duration

DEFAULT_TTL = 30.0
# How long past its ttl an entry may still answer while the origin is failing.
DEFAULT_STALE_IF_ERROR = 300.0
DEFAULT_MAX_ENTRIES = 100_000
# Longest one origin load may take before it counts as a failure.
DEFAULT_ORIGIN_TIMEOUT = 2.0
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_RESET = 5.0

Clock = Callable[[], float]
Freshness = Literal["fresh", "stale", "expired"]


class OriginUnavailable(ContextError):
    """The origin failed (or the breaker is open) and no usable stale entry exists."""


# -- pure ----------------------------------------------------------------------------------


def freshness(age: float, ttl: float, stale_if_error: float) -> Freshness:
    """``fresh`` (serve), ``stale`` (serve only if the origin fails), ``expired`` (never)."""
    if age < ttl:
        return "fresh"
    if age < ttl + stale_if_error:
        return "stale"
    return "expired"


@dataclass
class _Entry:
    value: Any
    loaded_at: float
    epoch: int | None


class GuardedCache:
    """Per-user cache in front of an origin. See docs/context.md.

    ``await cache.get(user, key, load)`` returns the cached value or ``await load()``'s,
    coalesced, guarded by the breaker and bounded by ``origin_timeout``; raises
    :class:`OriginUnavailable` when the origin cannot answer and no stale entry may.
    """

    def __init__(
        self,
        *,
        store: Any = None,
        ttl: float | str = DEFAULT_TTL,
        stale_if_error: float | str = DEFAULT_STALE_IF_ERROR,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        origin_timeout: float | str = DEFAULT_ORIGIN_TIMEOUT,
        breaker_failures: int = DEFAULT_BREAKER_FAILURES,
        breaker_reset: float | str = DEFAULT_BREAKER_RESET,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        problems = []
        counts: tuple[tuple[str, int], ...] = (
            ("max_entries", max_entries),
            ("breaker_failures", breaker_failures),
        )
        for name, count in counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                problems.append(f"{name}: must be a positive integer, got {count!r}")
        durations: dict[str, float] = {}
        spans: tuple[tuple[str, float | str], ...] = (
            ("ttl", ttl),
            ("origin_timeout", origin_timeout),
            ("breaker_reset", breaker_reset),
        )
        for name, span in spans:
            try:
                durations[name] = parse_duration(span, name=name)
            except ConfigError as exc:
                problems.append(str(exc))
        if stale_if_error in (0, 0.0, "0"):
            durations["stale_if_error"] = 0.0
        else:
            try:
                durations["stale_if_error"] = parse_duration(stale_if_error, name="stale_if_error")
            except ConfigError as exc:
                problems.append(str(exc) + " (or 0: never serve stale)")
        if problems:
            raise ConfigError("; ".join(problems))
        self.store = store
        self.ttl = durations["ttl"]
        self.stale_if_error = durations["stale_if_error"]
        self.origin_timeout = durations["origin_timeout"]
        self.max_entries = max_entries
        self.breaker = CircuitBreaker(breaker_failures, durations["breaker_reset"])
        if registry is None and store is not None:
            registry = store.metrics.registry
        self.metrics = CacheMetrics(registry)
        self._clock = clock
        self._entries: OrderedDict[tuple[str, Hashable], _Entry] = OrderedDict()
        self._by_user: dict[str, set[Hashable]] = {}
        self._loads: dict[tuple[str, Hashable], asyncio.Task[Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def breaker_state(self) -> BreakerState:
        return self.breaker.state

    def _epoch(self, user: str) -> int | None:
        return None if self.store is None else self.store.epoch_of(user)

    def _usable(self, user: str, entry: _Entry) -> bool:
        """Loaded under the user's current epoch (always, without a store)."""
        if self.store is None:
            return True
        return entry.epoch is not None and entry.epoch == self._epoch(user)

    # -- reading -------------------------------------------------------------------------

    async def get(self, user: str, key: Hashable, load: Callable[[], Awaitable[Any]]) -> Any:
        slot = (user, key)
        entry = self._entries.get(slot)
        if entry is not None and not self._usable(user, entry):
            self._drop(slot)
            entry = None
        now = self._clock()
        state = (
            freshness(now - entry.loaded_at, self.ttl, self.stale_if_error)
            if entry is not None
            else "expired"
        )
        if entry is not None and state == "fresh":
            self._entries.move_to_end(slot)
            self.metrics.lookups.labels("hit").inc()
            return entry.value
        stale = entry if state == "stale" else None
        task = self._loads.get(slot)
        if task is not None:
            self.metrics.lookups.labels("coalesced").inc()
        else:
            allowed = self.breaker.allow(now)
            self._update_breaker_gauge()
            if not allowed:
                return self._fallback(stale, "origin circuit open")
            self.metrics.lookups.labels("miss").inc()
            task = self._loads[slot] = asyncio.ensure_future(
                self._load(slot, load, self._epoch(user))
            )
            task.add_done_callback(self._load_done(slot))
        try:
            return await asyncio.shield(task)
        except OriginUnavailable as exc:
            return self._fallback(stale, str(exc))

    def _load_done(self, slot: tuple[str, Hashable]) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            if self._loads.get(slot) is task:
                del self._loads[slot]
            if not task.cancelled():
                task.exception()  # retrieved: every waiter may have gone

        return done

    async def _load(
        self, slot: tuple[str, Hashable], load: Callable[[], Awaitable[Any]], epoch: int | None
    ) -> Any:
        try:
            async with asyncio.timeout(self.origin_timeout):
                value = await load()
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except TimeoutError as exc:
            self._failed("timeout")
            raise OriginUnavailable(
                f"origin did not answer within {self.origin_timeout:g}s"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - any origin failure counts towards the breaker
            self._failed("error")
            raise OriginUnavailable(f"origin failed: {type(exc).__name__}: {exc}") from exc
        self.breaker.record_success()
        self.metrics.origin_loads.labels("ok").inc()
        self._update_breaker_gauge()
        user = slot[0]
        # Stored only if the user was not moved (nor invalidated) while the load ran.
        if self.store is None or (epoch is not None and epoch == self._epoch(user)):
            self._put(slot, _Entry(value, self._clock(), epoch))
        return value

    def _failed(self, outcome: str) -> None:
        self.breaker.record_failure(self._clock())
        self.metrics.origin_loads.labels(outcome).inc()
        self._update_breaker_gauge()

    def _fallback(self, stale: _Entry | None, why: str) -> Any:
        if stale is not None:
            self.metrics.lookups.labels("stale").inc()
            return stale.value
        self.metrics.lookups.labels("unavailable").inc()
        raise OriginUnavailable(why)

    def _update_breaker_gauge(self) -> None:
        self.metrics.breaker_state.set(int(self.breaker.state))

    # -- writing -------------------------------------------------------------------------

    def _put(self, slot: tuple[str, Hashable], entry: _Entry) -> None:
        self._entries[slot] = entry
        self._entries.move_to_end(slot)
        self._by_user.setdefault(slot[0], set()).add(slot[1])
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))
        self.metrics.entries.set(len(self._entries))

    def _drop(self, slot: tuple[str, Hashable]) -> None:
        if self._entries.pop(slot, None) is None:
            return
        keys = self._by_user.get(slot[0])
        if keys is not None:
            keys.discard(slot[1])
            if not keys:
                del self._by_user[slot[0]]
        self.metrics.entries.set(len(self._entries))

    def set(self, user: str, key: Hashable, value: Any) -> None:
        """Put a value the app just wrote to the origin (write-through from the app)."""
        self._put((user, key), _Entry(value, self._clock(), self._epoch(user)))

    def invalidate(self, user: str, key: Hashable | None = None) -> int:
        """Forget one key of ``user``, or all of them. A load in flight is not stored when it
        ends (it may hold the old value). Returns how many entries were dropped."""
        keys = [key] if key is not None else list(self._by_user.get(user, ()))
        dropped = 0
        for k in keys:
            slot = (user, k)
            if slot in self._entries:
                self._drop(slot)
                dropped += 1
            task = self._loads.pop(slot, None)
            if task is not None:
                # Its waiters still get its value; it is no longer cached when it lands.
                task.add_done_callback(self._dropper(slot))
        self.metrics.invalidations.inc(dropped)
        return dropped

    def _dropper(self, slot: tuple[str, Hashable]) -> Callable[[asyncio.Task[Any]], None]:
        def drop(_task: asyncio.Task[Any]) -> None:
            self._drop(slot)

        return drop

    async def close(self) -> None:
        """Cancel loads in flight and forget every entry."""
        tasks = list(self._loads.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError, OriginUnavailable):
                await task
        self._entries.clear()
        self._by_user.clear()
        self.metrics.entries.set(0)
