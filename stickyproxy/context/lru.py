"""LRU accounting bounded by entry count and by total bytes: pure, no I/O."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class _Slot(Generic[V]):
    value: V
    size: int


class LruCache(Generic[V]):
    """Least-recently-used map from key to value with a byte size per value.

    Invariants: ``len(self) <= max_entries`` and ``self.bytes <= max_bytes`` after every call;
    ``self.bytes`` is the sum of the sizes of the values held.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._slots: OrderedDict[str, _Slot[V]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._slots))

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> V | None:
        """The value for ``key``, marked most recently used; None if absent."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._slots.move_to_end(key)
        return slot.value

    def peek(self, key: str) -> V | None:
        """The value for ``key`` without changing its recency."""
        slot = self._slots.get(key)
        return None if slot is None else slot.value

    def put(self, key: str, value: V, size: int) -> list[str]:
        """Store ``value`` as most recently used; return the keys evicted to stay in bounds.

        A value larger than ``max_bytes`` is not stored (any older value for the key is removed)
        and its own key is reported as evicted.
        """
        if size < 0:
            raise ValueError("size must be >= 0")
        self.pop(key)
        if size > self.max_bytes:
            return [key]
        self._slots[key] = _Slot(value, size)
        self._bytes += size
        evicted: list[str] = []
        while len(self._slots) > self.max_entries or self._bytes > self.max_bytes:
            old_key, old = self._slots.popitem(last=False)
            self._bytes -= old.size
            evicted.append(old_key)
        return evicted

    def pop(self, key: str) -> V | None:
        slot = self._slots.pop(key, None)
        if slot is None:
            return None
        self._bytes -= slot.size
        return slot.value

    def clear(self) -> None:
        self._slots.clear()
        self._bytes = 0
