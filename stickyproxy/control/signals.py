"""Signal handlers that can be installed before start-up finishes."""

from __future__ import annotations

from collections.abc import Callable


class SignalLatch:
    """Calls ``action`` on each signal once armed; a signal before that is remembered and
    acted on when armed, so nothing received during start-up is lost or fatal."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.armed = False
        self.pending = False

    def __call__(self) -> None:
        if self.armed:
            self.action()
        else:
            self.pending = True

    def arm(self) -> None:
        self.armed = True
        if self.pending:
            self.pending = False
            self.action()
