"""The membership guard: when a discovered set of backends may replace the current one (pure).

Rules, in order, for each observed set:
1. An empty set is refused, always: no answer ever empties the ring (a DNS blip, an
   NXDOMAIN while a Service is recreated, a truncated file).
2. A set equal to the current one is ``unchanged`` and forgets any pending candidate.
3. A set different from the pending candidate becomes the candidate, seen from ``now``.
4. A candidate seen unchanged for less than ``settle`` seconds: ``wait``.
5. A settled candidate that removes more than ``max_drop_share`` of the current members is
   refused; the current set stays. It stays refused while the sources keep giving it; any
   other set starts again at rule 3. ``first`` marks the first refusal of a candidate, so
   the adapter logs and counts it once.
6. Otherwise: ``apply``. The guard's current set changes only when the caller reports the
   step done (``applied``), so a step the reload path rejected is tried again next round.
With no current set (nothing applied yet) the first non-empty set is applied at once:
there is nothing to protect and no reason to start without backends.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Backend

APPLY = "apply"
WAIT = "wait"
REFUSE = "refuse"
UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Decision:
    action: str  # APPLY, WAIT, REFUSE or UNCHANGED
    reason: str
    backends: tuple[Backend, ...] = ()  # the candidate (sorted by id)
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    first: bool = True  # REFUSE: first refusal of this candidate
    wait: float = 0.0  # WAIT: seconds of settling left


def canonical(backends: tuple[Backend, ...] | list[Backend]) -> tuple[Backend, ...]:
    return tuple(sorted(backends, key=lambda b: b.id))


class MembershipGuard:
    def __init__(
        self, settle: float, max_drop_share: float, current: tuple[Backend, ...] = ()
    ) -> None:
        self.settle = settle
        self.max_drop_share = max_drop_share
        self.current = canonical(current)
        self._candidate: tuple[Backend, ...] | None = None
        self._since = 0.0
        self._refused: tuple[Backend, ...] | None = None

    def observe(self, now: float, backends: tuple[Backend, ...] | list[Backend]) -> Decision:
        seen = canonical(backends)
        if not seen:
            self._candidate = None
            first = self._refused != ()
            self._refused = ()
            return Decision(REFUSE, "empty set: never applied, the current set stays", first=first)
        if seen == self.current:
            self._candidate = None
            self._refused = None
            return Decision(UNCHANGED, "unchanged", seen)
        old_ids = {b.id for b in self.current}
        new_ids = {b.id for b in seen}
        added = tuple(sorted(new_ids - old_ids))
        removed = tuple(sorted(old_ids - new_ids))
        if not self.current:
            return Decision(APPLY, "first set", seen, added, removed)
        if seen != self._candidate:
            self._candidate = seen
            self._since = now
            if seen != self._refused:
                self._refused = None
        held = now - self._since
        if held < self.settle:
            return Decision(
                WAIT,
                f"settling: seen unchanged for {held:.3g}s of {self.settle:g}s",
                seen,
                added,
                removed,
                wait=self.settle - held,
            )
        share = len(removed) / len(self.current)
        if share > self.max_drop_share:
            first = self._refused != seen
            self._refused = seen
            return Decision(
                REFUSE,
                f"would remove {len(removed)} of {len(self.current)} members "
                f"({share:.0%}), more than max_drop_share {self.max_drop_share:.0%}",
                seen,
                added,
                removed,
                first=first,
            )
        return Decision(APPLY, f"settled for {held:.3g}s", seen, added, removed)

    def applied(self, backends: tuple[Backend, ...] | list[Backend]) -> None:
        """The reload path took this set: it is the current one now."""
        self.current = canonical(backends)
        self._candidate = None
        self._refused = None
