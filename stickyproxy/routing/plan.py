"""What a configuration change does to routing, before it is made: pure, no I/O.

``exact`` measures the moved share of the hash space from the two continua (no sampling);
``sampled`` maps concrete keys (a key file, or synthetic keys) through both rings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..config import Config
from .ring import Member, Ring, moved_share


def ring_of(cfg: Config) -> Ring:
    return Ring([Member(b.id, b.weight) for b in cfg.backends], cfg.routing.vnodes)


@dataclass
class Plan:
    old_fingerprint: str
    new_fingerprint: str
    basis: str  # "key space" or "N keys"
    moved: float  # share of users that change backend
    flows: dict[tuple[str, str], float] = field(default_factory=dict)
    old_share: dict[str, float] = field(default_factory=dict)
    new_share: dict[str, float] = field(default_factory=dict)
    ideal: float = 0.0  # what would move if shares matched weights

    def as_dict(self) -> dict:
        return {
            "old_ring": self.old_fingerprint,
            "new_ring": self.new_fingerprint,
            "basis": self.basis,
            "moved": round(self.moved, 6),
            "ideal": round(self.ideal, 6),
            "flows": [
                {"from": a, "to": b, "share": round(s, 6)}
                for (a, b), s in sorted(self.flows.items(), key=lambda kv: -kv[1])
            ],
            "old_share": {k: round(v, 6) for k, v in sorted(self.old_share.items())},
            "new_share": {k: round(v, 6) for k, v in sorted(self.new_share.items())},
        }


def _ideal(old: Ring, new: Ring) -> float:
    """The share that would move if every backend's share matched its weight exactly:
    the total growth of the shares (users move only onto backends whose share grows)."""

    def shares(r: Ring) -> dict[str, float]:
        total = sum(m.weight for m in r.members) or 1
        return {m.id: m.weight / total for m in r.members}

    a, b = shares(old), shares(new)
    return sum(max(0.0, b.get(k, 0.0) - a.get(k, 0.0)) for k in set(a) | set(b))


def exact(old: Ring, new: Ring) -> Plan:
    flows = moved_share(old, new)
    return Plan(
        old.fingerprint,
        new.fingerprint,
        "key space",
        sum(flows.values()),
        flows,
        old.key_share(),
        new.key_share(),
        _ideal(old, new),
    )


def sampled(old: Ring, new: Ring, keys: Iterable[str]) -> Plan:
    counts: dict[tuple[str, str], int] = {}
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    n = 0
    for key in keys:
        n += 1
        a, b = old.owner(key) or "-", new.owner(key) or "-"  # "-": an empty ring
        before[a] = before.get(a, 0) + 1
        after[b] = after.get(b, 0) + 1
        if a != b:
            counts[(a, b)] = counts.get((a, b), 0) + 1
    d = n or 1
    flows = {k: v / d for k, v in counts.items()}
    return Plan(
        old.fingerprint,
        new.fingerprint,
        f"{n} keys",
        sum(flows.values()),
        flows,
        {k: v / d for k, v in before.items()},
        {k: v / d for k, v in after.items()},
        _ideal(old, new),
    )


def synthetic_keys(n: int) -> Iterable[str]:
    """Deterministic keys shaped like user ids, for ``--sample``."""
    return (f"user-{i:08d}" for i in range(n))
