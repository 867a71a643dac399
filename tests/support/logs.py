"""Log capture that keeps, with each record, what a probe said at the moment it was logged
(so a test can check a log line against the state it describes)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any


class Snapshotting(logging.Handler):
    """Keeps each record together with the value of ``probe()`` at the moment it was logged."""

    def __init__(self, probe: Callable[[], Any] = lambda: None):
        super().__init__(logging.DEBUG)
        self.probe = probe
        self.records: list[tuple[logging.LogRecord, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record, self.probe()))

    def messages(self) -> list[str]:
        return [r.getMessage() for r, _ in self.records]
