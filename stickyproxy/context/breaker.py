"""Circuit breaker state machine: pure, driven by an injected clock value.

closed --(failure_threshold consecutive failures)--> open
open --(reset_after elapsed; the next caller becomes the probe)--> half_open
half_open --(probe succeeds)--> closed;  half_open --(probe fails)--> open
While open, and in half_open while the probe is in flight, every call is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class BreakerState(IntEnum):
    """Values are what the ``stickyctx_breaker_state`` gauge reports."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass
class CircuitBreaker:
    failure_threshold: int
    reset_after: float
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.reset_after <= 0:
            raise ValueError("reset_after must be > 0")

    def allow(self, now: float) -> bool:
        """Whether a call may go to the network now. A True in half_open makes the caller the probe."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.reset_after:
                return False
            self.state = BreakerState.HALF_OPEN
            self.probe_in_flight = False
        if self.probe_in_flight:
            return False
        self.probe_in_flight = True
        return True

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.probe_in_flight = False

    def record_failure(self, now: float) -> None:
        self.probe_in_flight = False
        if self.state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        self.failures += 1
        if self.state is BreakerState.CLOSED and self.failures >= self.failure_threshold:
            self._open(now)

    def abandon(self) -> None:
        """A call ended without a verdict (cancelled): free the probe slot, change nothing else."""
        self.probe_in_flight = False

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.failures = 0
