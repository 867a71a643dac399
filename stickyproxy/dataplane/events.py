"""What the data plane reports: health, metrics and the access log subscribe here.

The data plane calls these on the hot path, so implementations must be cheap and never
raise; the base class does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..routing.router import BackendState
    from .exchange import Exchange


class Events:
    def connect_failed(self, backend: BackendState, kind: str) -> None:
        """A connect to ``backend`` failed (kind: "connect" or "timeout")."""

    def upstream_error(self, backend: BackendState, kind: str, blame: bool = True) -> None:
        """kind: "connect" | "timeout" | "reset" | "protocol" | "stale"; ``blame``: passive
        health counts it as the backend's failure (a stale pooled connection is not)."""

    def upstream_ok(self, backend: BackendState, status: int) -> None:
        """A backend answered with ``status`` (passive health counts 5xx if configured)."""

    def retry(self, backend: BackendState, reason: str) -> None:
        """An exchange is retried away from ``backend``."""

    def retry_denied(self, backend: BackendState, reason: str) -> None:
        """A failed attempt on ``backend`` was not retried (reason: "budget", "attempts",
        "no-backend", "not-replayable")."""

    def request_done(self, ex: Exchange) -> None:
        """An exchange finished (answered, failed or aborted)."""

    def request_rejected(self, status: int) -> None:
        """The proxy refused a request itself (malformed, too large, too many connections)."""

    def client_opened(self) -> None: ...
    def client_closed(self) -> None: ...
    def tunnel_opened(self, backend: BackendState) -> None: ...
    def tunnel_closed(self, backend: BackendState) -> None: ...
