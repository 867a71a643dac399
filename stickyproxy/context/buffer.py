"""Writes waiting for Redis: the latest payload per user, bounded in users. Pure, no I/O."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class PendingWrite:
    epoch: int
    payload: bytes


class PendingWrites:
    """Invariant: at most ``max_users`` users, one (latest) payload each, oldest first.

    A newer payload for a user replaces the older one (the older is subsumed); a payload with a
    different epoch than the one buffered replaces it too, since only the newest ownership can
    still commit.
    """

    def __init__(self, max_users: int) -> None:
        if max_users < 1:
            raise ValueError("max_users must be >= 1")
        self.max_users = max_users
        self._items: OrderedDict[str, PendingWrite] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, user: object) -> bool:
        return user in self._items

    def users(self) -> list[str]:
        return list(self._items)

    def get(self, user: str) -> PendingWrite | None:
        return self._items.get(user)

    def put(self, user: str, write: PendingWrite) -> bool:
        """Buffer ``write`` for ``user``; False (nothing changed) if full and ``user`` is new."""
        if user not in self._items and len(self._items) >= self.max_users:
            return False
        self._items[user] = write
        return True

    def pop(self, user: str) -> PendingWrite | None:
        return self._items.pop(user, None)

    def restore(self, user: str, write: PendingWrite) -> bool:
        """Put back a write whose flush failed or was cancelled, unless a newer one arrived
        meanwhile (False). It was counted against the bound when accepted, so it goes back even
        if others filled the room it left: the bound is exceeded by at most the number of
        flushes in flight (one per user lock held), and an acknowledged change is never lost."""
        if user in self._items:
            return False
        self._items[user] = write
        self._items.move_to_end(user, last=False)
        return True
