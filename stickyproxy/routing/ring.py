"""The consistent-hash ring and each key's preference list: pure, no I/O.

uhashring's default mode (md5, ``vnodes`` points per unit of weight), so any
ketama-style client with the same members agrees. Invariants (DESIGN.md §2–3):

- Nodes are backend *ids*, never addresses: proxies whose backends resolve to different IPs
  still agree (P1). Members are inserted in id order, so even a hash collision between two
  nodes' points resolves the same way whatever order the config lists them in.
- Health never rebuilds the ring. An unusable backend is skipped by walking the key's
  preference list, which maps every key exactly as removing the node would (P2, P3).
- The hot path is one lookup when the key's owner is usable: md5 and a bisect over the
  continuum uhashring built (``get_points``), the computation of its ``get_node`` without
  its four layers of calls (tests/test_ring.py checks they agree key for key). The points
  are kept as 16-byte big-endian digests: bytes compare as the numbers do, so the key's
  digest is searched as it is, never converted to an int.
"""

from __future__ import annotations

import hashlib
import importlib
from bisect import bisect_right
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final

from uhashring import HashRing


def _short_input_md5() -> Callable[[bytes], Any]:
    """CPython's own md5 hashes a short key in about half the time of OpenSSL's (whose
    per-call context setup dominates at this size); the digests are the same."""
    try:
        return importlib.import_module("_md5").md5  # type: ignore[no-any-return]
    except ImportError:  # an interpreter built without its builtin hashes
        return hashlib.md5


md5: Final = _short_input_md5()

HASH_SPACE: Final = 1 << 128  # md5 digests, as uhashring hashes keys and points
DIGEST_BYTES: Final = 16
# Keys whose owner a ring remembers: a user's repeat requests skip the md5 (~1 µs). Bounded
# (~5 MB at the longest keys); when full it starts over, so a larger active set costs no
# more than no cache at all.
OWNER_CACHE_SIZE = 16_384


@dataclass(frozen=True)
class Member:
    id: str
    weight: int = 1


@dataclass(frozen=True)
class Pick:
    """The backend chosen for a key: ``backend`` is None when none is usable."""

    backend: str | None
    primary: bool
    owner: str | None


def fingerprint(members: Iterable[Member], vnodes: int) -> str:
    """A short stable hash of ids, weights and vnodes (sent to backends as X-Sticky-Ring).

    Independent of member order and of addresses: equal fingerprints mean equal rings.
    """
    text = f"v1;vnodes={vnodes};" + ";".join(
        f"{m.id}={m.weight}" for m in sorted(members, key=lambda m: m.id)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Ring:
    """An immutable ring over ``members``; build a new one to change membership."""

    __slots__ = (
        "members",
        "vnodes",
        "fingerprint",
        "_ring",
        "_ids",
        "_points",
        "_owners",
        "_cache",
    )

    def __init__(self, members: Iterable[Member], vnodes: int = 160):
        self.members: tuple[Member, ...] = tuple(sorted(members, key=lambda m: m.id))
        if len({m.id for m in self.members}) != len(self.members):
            raise ValueError("member ids must be unique")
        if any(m.weight < 1 for m in self.members):
            raise ValueError("weights must be >= 1")
        self.vnodes = vnodes
        self.fingerprint = fingerprint(self.members, vnodes)
        self._ids = frozenset(m.id for m in self.members)
        nodes = {m.id: {"weight": m.weight, "vnodes": vnodes} for m in self.members}
        self._ring = HashRing(nodes=nodes, vnodes=vnodes)
        continuum = self._ring.get_points()
        self._points: list[bytes] = [p.to_bytes(DIGEST_BYTES, "big") for p, _ in continuum]
        self._owners: list[str] = [n for _, n in continuum]
        self._cache: dict[str, str] = {}  # valid for the ring's life: it never changes

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, backend_id: str) -> bool:
        return backend_id in self._ids

    def owner(self, key: str) -> str | None:
        """The key's primary backend (None on an empty ring): the first point strictly
        above the key's md5, wrapping at the end (uhashring's default hash and order)."""
        cache = self._cache
        found = cache.get(key)
        if found is not None:
            return found
        points = self._points
        if not points:
            return None
        i = bisect_right(points, md5(key.encode()).digest())
        owner = self._owners[i if i < len(points) else 0]
        if len(cache) >= OWNER_CACHE_SIZE:
            cache.clear()
        cache[key] = owner
        return owner

    def preference(self, key: str) -> list[str]:
        """Every member, ordered as the key would fail over along the ring."""
        if not self.members:
            return []
        return list(self._ring.iterate_nodes(key))

    def pick(self, key: str, usable: Callable[[str], bool] | Collection[str] | None = None) -> Pick:
        """The first usable backend along the key's preference list.

        ``usable`` is a predicate or a collection of usable ids; None means all are usable.
        Costs one lookup when the owner is usable.
        """
        owner = self.owner(key)
        if owner is None:
            return Pick(None, False, None)
        if usable is None:
            return Pick(owner, True, owner)
        ok = usable if callable(usable) else usable.__contains__
        if ok(owner):
            return Pick(owner, True, owner)
        for node in self._ring.iterate_nodes(key):
            if ok(node):
                return Pick(node, False, owner)
        return Pick(None, False, owner)

    def points(self) -> list[tuple[int, str]]:
        """The continuum as sorted (point, backend id) pairs."""
        return self._ring.get_points()

    def key_share(self) -> dict[str, float]:
        """Each member's exact share of the hash space (sums to 1.0).

        A key hashing to h belongs to the first point strictly above h (wrapping), so a
        point owns the arc from the previous point up to itself.
        """
        pts = self.points()
        share = {m.id: 0.0 for m in self.members}
        if not pts:
            return share
        prev = pts[-1][0] - HASH_SPACE
        for point, node in pts:
            share[node] += (point - prev) / HASH_SPACE
            prev = point
        return share


def moved_share(old: Ring, new: Ring) -> dict[tuple[str, str], float]:
    """The exact share of the hash space whose owner differs between two rings.

    Returns {(from_id, to_id): share} for every pair with a non-zero share: what a plan
    for a config change reports, without sampling keys.
    """
    a, b = old.points(), new.points()
    moved: dict[tuple[str, str], float] = {}
    if not a or not b:
        return moved
    # Every boundary of either ring splits the circle into arcs owned by one node in each.
    bounds = sorted({p for p, _ in a} | {p for p, _ in b})
    ia = ib = 0
    prev = bounds[-1] - HASH_SPACE
    for p in bounds:
        # the owner of the arc (prev, p] in each ring is its first point >= p
        while ia < len(a) and a[ia][0] < p:
            ia += 1
        while ib < len(b) and b[ib][0] < p:
            ib += 1
        oa = a[ia % len(a)][1]
        ob = b[ib % len(b)][1]
        if oa != ob:
            moved[(oa, ob)] = moved.get((oa, ob), 0.0) + (p - prev) / HASH_SPACE
        prev = p
    return moved
