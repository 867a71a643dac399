"""Backends whose health endpoint a test scripts check by check, and the HAProxy-style
rise/fall reference the proxy's active checks are compared with."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from support.backends import Recorded


def health_cfg(**kw: Any) -> dict[str, Any]:
    """[health] for fast, deterministic checks: 50 ms apart, no jitter."""
    base = {
        "enabled": True,
        "path": "/healthz",
        "interval": "50ms",
        "timeout": "50ms",
        "rise": 2,
        "fall": 3,
        "jitter": 0.0,
    }
    base.update(kw)
    return base


class HealthScript:
    """What a backend's health endpoint answers, check by check.

    ``queue`` is consumed first (one entry per check); when it is empty every check gets
    ``hold``. An entry is a status code or ``"close"`` (the connection is dropped without an
    answer). ``served`` lists what each check got, in order; ``on_check`` is called with the
    check's index after it is recorded.
    """

    def __init__(self, hold: int | str = 200):
        self.queue: deque[int | str] = deque()
        self.hold: int | str = hold
        self.served: list[int | str] = []
        self.times: list[float] = []  # when each check arrived (monotonic)

    def script(self, *outcomes: int | str, hold: int | str | None = None) -> None:
        self.queue.extend(outcomes)
        if hold is not None:
            self.hold = hold

    def take(self) -> int | str:
        out = self.queue.popleft() if self.queue else self.hold
        self.served.append(out)
        self.times.append(time.monotonic())
        return out

    @property
    def count(self) -> int:
        return len(self.served)


def with_health(backend: Any, script: HealthScript, path: str = "/healthz") -> HealthScript:
    """Route ``path`` on an AioBackend to ``script``; everything else to its handler."""
    inner = backend.handler

    async def handler(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if request.path == path:
            outcome = script.take()
            if outcome == "close":
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=200)
            return web.Response(status=int(outcome), text="health\n")
        return await inner(request, rec)

    backend.handler = handler
    return script


def user_requests(backend: Any, path: str = "/healthz") -> list[Recorded]:
    """What a backend received apart from health checks."""
    return [r for r in backend.requests if not r.target.startswith(path)]


def simulate_rise_fall(
    served: list[int | str],
    rise: int,
    fall: int,
    ok: Callable[[int | str], bool] = lambda o: o == 200,
) -> list[tuple[int, str]]:
    """(1-based check number, "up"/"down") at which HAProxy-style rise/fall flips state,
    starting up."""
    up, succ, fail, out = True, 0, 0, []
    for i, o in enumerate(served, 1):
        if ok(o):
            fail, succ = 0, succ + 1
            if not up and succ >= rise:
                up = True
                out.append((i, "up"))
        else:
            succ, fail = 0, fail + 1
            if up and fail >= fall:
                up = False
                out.append((i, "down"))
    return out
