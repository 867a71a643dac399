"""A check, before any load, that a target answers and routes each user to one backend."""

from __future__ import annotations

import http.client

from .procs import LOOPBACK
from .targets import BACKEND_HEADER, BODY, USER_HEADER

PROBE_USERS = 30
PROBE_REPEATS = 2
PROBE_TIMEOUT = 5.0
MIN_BACKENDS_SEEN = 2


class ProbeError(Exception):
    """The target answered wrongly, or did not keep a user on one backend."""


def _fetch(conn: http.client.HTTPConnection, user: str) -> str:
    conn.request("GET", "/", headers={USER_HEADER: user})
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    if response.status != 200 or body != BODY:
        raise ProbeError(f"user {user}: status {response.status}, body {body[:60]!r}")
    backend = response.getheader(BACKEND_HEADER)
    if not backend:
        raise ProbeError(f"user {user}: no {BACKEND_HEADER} header in the response")
    return backend


def check_sticky_routing(port: int) -> dict[str, str]:
    """Map each probe user to its backend; raise ProbeError unless routing is sticky."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=PROBE_TIMEOUT)
    placement: dict[str, str] = {}
    try:
        for _ in range(PROBE_REPEATS):
            for i in range(1, PROBE_USERS + 1):
                user = f"user-{i}"
                backend = _fetch(conn, user)
                if placement.setdefault(user, backend) != backend:
                    raise ProbeError(f"user {user} went to {placement[user]}, then to {backend}")
    except (OSError, http.client.HTTPException) as e:
        raise ProbeError(f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()
    if len(set(placement.values())) < MIN_BACKENDS_SEEN:
        raise ProbeError(f"all {PROBE_USERS} probe users went to one backend")
    return placement
