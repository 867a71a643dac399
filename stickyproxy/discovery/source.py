"""What every discovery source shares: the polling loop around the membership guard.

A source is polled (``poll`` returns one observation), the guard decides, and an applied
step is handed to the caller's ``on_change``. Everything runs on the event loop that runs
``watch``; ``on_change`` is awaited there, one call at a time, never concurrently with
another round of the same source.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..config import Backend, ConfigError
from .guard import APPLY, REFUSE, WAIT, Decision, MembershipGuard
from .settings import DiscoverySettings

log = logging.getLogger("stickyproxy.discovery")

OnChange = Callable[[tuple[Backend, ...]], Awaitable[None]]


@dataclass(frozen=True)
class Poll:
    """One look at a source: the members seen (``None``: the look failed, nothing is known),
    what was left out and why, and how long to wait before the next look."""

    backends: tuple[Backend, ...] | None
    delay: float
    problems: tuple[str, ...] = ()
    error: str = ""


@dataclass
class DiscoveryStats:
    """Counters for metrics (monotonic) and the latest state, for the admin API."""

    rounds: int = 0  # looks completed
    failures: int = 0  # looks that failed (timeout, server error, unreadable file)
    refused: int = 0  # distinct candidate sets refused by the guard
    applied: int = 0  # steps taken by on_change
    apply_failures: int = 0  # steps on_change raised on (tried again next round)
    members: int = 0  # members in the current set
    pending: bool = False  # a candidate is settling
    refusing: bool = False  # the latest settled candidate was refused
    last_error: str = ""
    last_decision: str = ""
    problems: tuple[str, ...] = field(default_factory=tuple)


class Source:
    """Base of the DNS and file sources: ``await watch(on_change)`` until ``stop()``."""

    kind = "source"

    def __init__(
        self,
        settings: DiscoverySettings,
        current: tuple[Backend, ...] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.guard = MembershipGuard(settings.settle, settings.max_drop_share, current)
        self.stats = DiscoveryStats(members=len(current))
        self.clock = clock
        self._stopped = asyncio.Event()

    @property
    def current(self) -> tuple[Backend, ...]:
        return self.guard.current

    @property
    def min_delay(self) -> float:
        raise NotImplementedError

    async def poll(self) -> Poll:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        """Ends ``watch`` after the round in progress (a query is bounded by its timeout)."""
        self._stopped.set()

    async def close(self) -> None:
        """Releases what the source holds; after ``watch`` returned."""

    async def step(self, on_change: OnChange) -> tuple[Decision, float]:
        """One round: poll, decide, apply. Returns the decision and the delay to the next."""
        try:
            poll = await self.poll()
        except Exception as e:  # a source bug must not end discovery; the set stays
            log.exception("discovery %s: look failed", self.describe())
            poll = Poll(None, self.min_delay, error=f"{type(e).__name__}: {e}")
        self.stats.rounds += 1
        if poll.problems != self.stats.problems:
            for p in poll.problems:
                if p not in self.stats.problems:
                    log.warning("discovery %s: %s", self.describe(), p)
            self.stats.problems = poll.problems
        if poll.backends is None:
            self.stats.failures += 1
            if poll.error != self.stats.last_error:
                log.warning(
                    "discovery %s: %s; keeping the current %d members",
                    self.describe(),
                    poll.error,
                    len(self.current),
                )
            self.stats.last_error = poll.error
            return Decision(WAIT, poll.error), poll.delay
        if self.stats.last_error:
            log.info("discovery %s: answering again", self.describe())
        self.stats.last_error = ""
        d = self.guard.observe(self.clock(), poll.backends)
        self.stats.last_decision = f"{d.action}: {d.reason}"
        self.stats.pending = d.action == WAIT
        self.stats.refusing = d.action == REFUSE
        delay = poll.delay
        if d.action == WAIT:
            log.info(
                "discovery %s: change seen (+%s -%s), %s",
                self.describe(),
                ",".join(d.added) or "0",
                ",".join(d.removed) or "0",
                d.reason,
            )
            delay = min(delay, max(d.wait, self.min_delay))
        elif d.action == REFUSE and d.first:
            self.stats.refused += 1
            log.warning(
                "discovery %s: refused (+%s -%s): %s; keeping the current %d members, asking again",
                self.describe(),
                ",".join(d.added) or "0",
                ",".join(d.removed) or "0",
                d.reason,
                len(self.current),
            )
        elif d.action == APPLY:
            try:
                await on_change(d.backends)
            except ConfigError as e:  # refused by the reload path: said, not a bug
                self.stats.apply_failures += 1
                log.error(
                    "discovery %s: applying %d members was refused: %s; trying again",
                    self.describe(),
                    len(d.backends),
                    e,
                )
                return d, self.min_delay
            except Exception:
                self.stats.apply_failures += 1
                log.exception(
                    "discovery %s: applying %d members failed; trying again",
                    self.describe(),
                    len(d.backends),
                )
                return d, self.min_delay
            self.guard.applied(d.backends)
            self.stats.applied += 1
            self.stats.members = len(d.backends)
            log.info(
                "discovery %s: applied %d members (+%s -%s), %s",
                self.describe(),
                len(d.backends),
                ",".join(d.added) or "0",
                ",".join(d.removed) or "0",
                d.reason,
            )
        return d, delay

    async def watch(self, on_change: OnChange) -> None:
        """Polls until ``stop()``; ``on_change`` gets each applied set (sorted by id)."""
        try:
            while not self._stopped.is_set():
                _, delay = await self.step(on_change)
                try:
                    await asyncio.wait_for(self._stopped.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            await self.close()
