"""Whether, and where, a failed attempt is tried again: pure, no I/O (tests/test_retry.py).

An attempt fails in one of these ways before any byte of its response reached the client
(after one did, the client connection is cut instead: a truncated body is never passed
off as complete). The decision weighs what a retry could cost:

- A refused connect sent nothing and says nothing listens there: the backend is gone, not
  busy. Retrying on the next backend is failover, free of the budget.
- A reset or close before any response byte, on a connection taken from the pool, is the
  race every keep-alive client has (RFC 9112 §9.3.1: a server may close an idle
  connection at any time): first retried on a new connection to the same backend, free
  of the budget, and not held against that backend by passive health.
- A reset before any response byte on a new connection means the backend died or is
  dying: the next backend, free of the budget (retries.attempts still bounds how many
  backends one request can reach). That holds for the new connection of a stale-connection
  retry too: while a killed backend is torn down its kernel can still accept a connection
  and then reset it (seen in the bench kill drill: 14 such resets at once went past the
  budget and were answered 502).
- A failed TLS handshake sent nothing either, but the host answered: a certificate not
  trusted, expired or for another name, which a retry on the same backend cannot mend.
  The next backend, within the budget, as for a connect timeout (its own kind, so metrics
  tell the two apart).
- A timeout (connect or response) or a malformed response is what an overloaded or
  broken backend does: retried only within the retry budget, so that retries cannot
  multiply the load of a fleet that is already slow.

Only idempotent requests without a body (``Exchange.replayable``) are retried once they
may have reached a backend (RFC 9110 §9.2.2); a failed connect sent nothing, so any
request is.
"""

from __future__ import annotations

from typing import Final

# failure kinds (also the `kind` label of upstream_errors_total)
CONNECT_REFUSED: Final = "connect"
CONNECT_TIMEOUT: Final = "connect-timeout"
TLS: Final = "tls"
RESET: Final = "reset"
TIMEOUT: Final = "timeout"
PROTOCOL: Final = "protocol"

# actions
NO_RETRY: Final = 0
SAME_BACKEND: Final = 1  # a new connection to the backend that failed
NEXT_BACKEND: Final = 2  # the next usable backend on the key's preference list


def decide(
    kind: str, replayable: bool, reused: bool, same_tried: bool, usable: bool
) -> tuple[int, bool]:
    """(action, whether the retry counts against the budget) after an attempt failed.

    ``replayable``: the request may be sent again (idempotent, no body, nothing sent to
    the client); ``reused``: the failed connection came from the pool; ``same_tried``: a
    new connection to this backend was already tried for this request; ``usable``: the
    backend may still be routed to.
    """
    if kind == CONNECT_REFUSED:
        return NEXT_BACKEND, False
    if kind == CONNECT_TIMEOUT or kind == TLS:
        return NEXT_BACKEND, True
    if not replayable:
        return NO_RETRY, False
    if kind == RESET:
        if reused and usable and not same_tried:
            return SAME_BACKEND, False
        return NEXT_BACKEND, False
    return NEXT_BACKEND, True  # TIMEOUT, PROTOCOL


def retry_reason(kind: str, action: int) -> str:
    """The `reason` label of retries_total for a retry decided by ``decide``."""
    return "stale-connection" if action == SAME_BACKEND else kind
