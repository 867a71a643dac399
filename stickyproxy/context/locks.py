"""Per-user asyncio locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class UserSlot:
    """State of one user while at least one task is inside :meth:`UserLocks.hold`.

    ``fence_epoch`` is the highest epoch at which another instance took the user over while
    the slot existed: a result obtained at a lower epoch is already stale and must not be cached.
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holders: int = 0
    fence_epoch: int = 0


class UserLocks:
    """Invariant: a slot is in the map exactly while ``holders > 0``, so the map never holds
    more users than there are tasks inside :meth:`hold` (no leak for evicted or idle users)."""

    def __init__(self) -> None:
        self._slots: dict[str, UserSlot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def peek(self, user: str) -> UserSlot | None:
        return self._slots.get(user)

    @asynccontextmanager
    async def hold(self, user: str) -> AsyncIterator[UserSlot]:
        slot = self._slots.get(user)
        if slot is None:
            slot = self._slots[user] = UserSlot()
        slot.holders += 1
        try:
            async with slot.lock:
                yield slot
        finally:
            slot.holders -= 1
            if slot.holders == 0:
                del self._slots[user]
