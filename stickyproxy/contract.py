"""What the proxy and the context library must agree on, declared once: pure, standard
library only (the library imports it without the proxy's dependencies).

The proxy names the headers it sets on every forwarded request from ``[headers] prefix``
(config.Headers); an app reads them with the library (context.headers). Both replay work
only for idempotent methods: the proxy retries them on another backend, the library's
middleware re-runs their handlers after a save conflict.
"""

from __future__ import annotations

from typing import Final

# DESIGN.md §4: the proxy ↔ backend headers, by default X-Sticky-Key, -Backend, -Route, -Ring.
HEADER_PREFIX: Final = "X-Sticky-"

# Values of the route header: the key's owner answered, or a backend further along the
# key's preference list because the owner was not usable.
ROUTE_PRIMARY: Final = "primary"
ROUTE_FAILOVER: Final = "failover"

# RFC 9110 §9.2.2: methods whose intended effect of several identical requests is the same
# as one.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def header_names(prefix: str = HEADER_PREFIX) -> tuple[str, str, str, str]:
    """(key, backend, route, ring) header names under ``prefix``."""
    return prefix + "Key", prefix + "Backend", prefix + "Route", prefix + "Ring"
