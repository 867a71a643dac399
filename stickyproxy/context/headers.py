"""The headers the proxy sets on forwarded requests, as seen by an app instance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..contract import HEADER_PREFIX, header_names

# The proxy's defaults (``[headers] prefix``), from the module both sides share.
DEFAULT_KEY_HEADER, DEFAULT_BACKEND_HEADER, DEFAULT_ROUTE_HEADER, DEFAULT_RING_HEADER = (
    header_names(HEADER_PREFIX)
)
# Longest user key accepted from a request; a longer one is answered 400, never stored.
MAX_USER_KEY_LENGTH = 1024


@dataclass(frozen=True)
class StickyHeaders:
    """Header names; defaults match the proxy's defaults."""

    key: str = DEFAULT_KEY_HEADER
    backend: str = DEFAULT_BACKEND_HEADER
    route: str = DEFAULT_ROUTE_HEADER
    ring: str = DEFAULT_RING_HEADER


@dataclass(frozen=True)
class StickyInfo:
    """What the proxy said about a request. Informational: correctness never depends on
    ``backend``, ``route`` (``primary``/``failover``) or ``ring`` (the ring fingerprint)."""

    user: str | None
    backend: str | None = None
    route: str | None = None
    ring: str | None = None

    @classmethod
    def from_lookup(cls, lookup: Callable[[str], str | None], names: StickyHeaders) -> StickyInfo:
        return cls(
            user=lookup(names.key) or None,
            backend=lookup(names.backend) or None,
            route=lookup(names.route) or None,
            ring=lookup(names.ring) or None,
        )


DEFAULT_HEADERS = StickyHeaders()


def user_key_problem(user: str) -> str | None:
    """Why ``user`` is not acceptable as a key, or None."""
    if len(user) > MAX_USER_KEY_LENGTH:
        return f"user key longer than {MAX_USER_KEY_LENGTH} characters"
    return None
