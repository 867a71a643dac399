"""Loopback addresses, free ports and polling with a deadline."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

LOCALHOST = "127.0.0.1"
# Upper bound on any single network wait in a test (a hang fails, it never blocks CI).
IO_TIMEOUT = 5.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


async def eventually(
    predicate: Callable[[], Any],
    *,
    deadline: float = IO_TIMEOUT,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {deadline}s")
        await asyncio.sleep(interval)
