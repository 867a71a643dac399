"""Gradual failback and slow start: which users have returned to a ramping backend. Pure.

When a backend recovers (or joins by config or discovery), sending all of its users back at
once makes every one of them rehydrate from Redis in the same second. A ramp returns them in
slices instead: each key has a fixed point in [0, 1) taken from a stable hash of the key, and
the key has returned to the backend once the ramp's progress has passed that point.

The curve is linear in the key space: ``progress(now) = (now - start) / duration`` clamped
to [0, 1], and a key has returned iff ``point < progress``. So at any instant the share of
the backend's keys that have returned equals the progress, and the users that return each
second are an even slice of its key space (a 30 s ramp: a thirtieth of its users each
second), whatever their request rates. Invariants:

- Deterministic: the decision depends only on the key, the ramp's start and duration, and
  the instant; two proxies that agree on the start agree on every key at the same instant
  (P1). The hash is blake2b, never Python's ``hash()`` (salted per process).
- Monotone: a key that has returned stays returned for the rest of the ramp (its point is
  fixed and progress only grows), so no user bounces between two backends during a ramp.
- Nobody has returned at ``start``, everybody at ``start + duration``; a zero duration means
  no ramp (everybody has returned).
- The point is independent of the key's ring position (md5 for the ring, a personalised
  blake2b here), so the slices are not arcs of the ring.

Cost: ``key_point`` is one blake2b of the key (the router computes it once per request and
only for a key whose owner is ramping); ``returned`` is a subtraction, a multiplication and
two comparisons.
"""

from __future__ import annotations

import math
from hashlib import blake2b
from typing import Final

# 64 bits: ties between two keys' points are negligible, and the product below stays exact
# in an int.
POINT_BYTES: Final = 8
POINT_SPACE: Final = 1 << (8 * POINT_BYTES)
# Personalisation: the ramp's points are unrelated to any other blake2b of the key (the
# access log's key_digest) and to the ring's md5.
PERSON: Final = b"sticky-ramp-v1"
# Copied per key: half the cost of passing the parameters to blake2b each time (measured).
_HASHER: Final = blake2b(digest_size=POINT_BYTES, person=PERSON)


def key_point(key: str) -> int:
    """The key's fixed point in [0, POINT_SPACE): the same in every process and release."""
    h = _HASHER.copy()
    h.update(key.encode("utf-8"))
    return int.from_bytes(h.digest(), "big")


def progress(start: float, duration: float, now: float) -> float:
    """Share of the ramp done at ``now``, in [0, 1] (1 when ``duration`` <= 0)."""
    if duration <= 0.0:
        return 1.0
    done = (now - start) / duration
    if done <= 0.0:
        return 0.0
    return done if done < 1.0 else 1.0


def returned(point: int, start: float, duration: float, now: float) -> bool:
    """Whether the key with ``point`` has returned to the ramping backend at ``now``."""
    if duration <= 0.0 or now >= start + duration:
        return True
    if now <= start:
        return False
    return point < (now - start) / duration * POINT_SPACE


def return_time(point: int, start: float, duration: float) -> float:
    """The instant just after which the key with ``point`` has returned (for ``route`` and
    ``/route``; exact up to float rounding)."""
    if duration <= 0.0:
        return start
    return start + duration * point / POINT_SPACE


class Ramp:
    """One backend's ramp: started at ``start`` (a clock every proxy of a fleet shares, such
    as wall time, for them to agree), lasting ``duration`` seconds."""

    __slots__ = ("start", "duration", "end")

    def __init__(self, start: float, duration: float):
        if math.isnan(duration) or duration < 0.0:
            raise ValueError(f"ramp duration must be >= 0 seconds, not {duration!r}")
        self.start = start
        self.duration = duration
        self.end = start + duration

    def __repr__(self) -> str:
        return f"Ramp(start={self.start!r}, duration={self.duration!r})"

    def active(self, now: float) -> bool:
        """Still ramping at ``now``: some of the backend's keys have not returned yet."""
        return now < self.end

    def progress(self, now: float) -> float:
        """0 at the start, 1 from the end on: the share of the backend's keys returned."""
        return progress(self.start, self.duration, now)

    def returned(self, point: int, now: float) -> bool:
        return returned(point, self.start, self.duration, now)

    def return_time(self, point: int) -> float:
        return return_time(point, self.start, self.duration)
