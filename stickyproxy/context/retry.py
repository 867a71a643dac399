"""Retry decisions, pure: which Redis operations may be retried, backoff, which HTTP methods
may be re-run after a conflict."""

from __future__ import annotations

from enum import StrEnum

from .. import contract


class Op(StrEnum):
    """The Redis operations the store performs; the value is the ``op`` label of error metrics."""

    ACQUIRE = "acquire"
    WRITE = "write"
    READ = "read"
    TOUCH = "touch"
    DELETE = "delete"


# Only operations whose repetition cannot change the outcome are retried. The acquire (it
# increments the epoch and publishes) and the write (a late duplicate could land after a
# takeover was noticed) are sent once; a failure is reported to the caller.
RETRYABLE_OPS: frozenset[Op] = frozenset({Op.READ, Op.TOUCH})

# One retry covers a connection the server closed while it sat idle in the pool.
MAX_READ_ATTEMPTS = 2

# Methods whose handlers may be run again after a conflict (RFC 9110 §9.2.2 idempotent methods).
IDEMPOTENT_METHODS: frozenset[str] = contract.IDEMPOTENT_METHODS


def should_retry_redis(op: Op, attempt: int, remaining: float) -> bool:
    """Whether a failed ``op`` (``attempt`` counted from 1) is tried again with ``remaining``
    seconds left of the caller's timeout."""
    return op in RETRYABLE_OPS and attempt < MAX_READ_ATTEMPTS and remaining > 0


def should_rerun_handler(method: str, attempt: int, max_attempts: int) -> bool:
    """Whether a handler that hit a conflict on its ``attempt``-th run (from 1) is run again."""
    return method.upper() in IDEMPOTENT_METHODS and attempt < max_attempts


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential delay before reconnect ``attempt`` (from 1): base, 2·base, 4·base, … ≤ cap."""
    if attempt < 1:
        return 0.0
    return float(min(cap, base * 2.0 ** min(attempt - 1, 32)))
