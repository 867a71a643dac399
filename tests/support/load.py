"""A bounded load loop: a fixed number of requests over keep-alive connections, each tagged
with the test's phase, with every outcome kept."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from support.net import LOCALHOST, eventually


@dataclass
class Outcome:
    user: str
    method: str
    status: int | None  # None: the request failed at the HTTP level
    backend: str | None  # the backend that answered (its X-Backend)
    phase: str  # the test's phase when the request was sent
    sent: float
    done: float
    error: str = ""
    rid: int = -1  # the request's X-Req-Id


class Load:
    """``concurrency`` workers sending ``total`` requests (no more) for ``users`` over
    keep-alive connections, each tagged with the current ``phase`` (``X-Phase``) so a
    backend's record tells when the request was sent. Every third request is a POST with a
    body (not retryable after it was sent), the rest GETs."""

    def __init__(
        self,
        port: int,
        users: list[str],
        *,
        total: int = 600,
        concurrency: int = 8,
        post_every: int = 3,
        timeout: float = 5.0,
        new_connections: bool = False,
    ):
        self.port = port
        self.users = users
        self.total = total
        self.concurrency = concurrency
        self.post_every = post_every
        self.timeout = timeout
        self.new_connections = new_connections
        self.phase = "start"
        self.outcomes: list[Outcome] = []
        self._next = 0
        self.task: asyncio.Task | None = None

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def in_phase(self, phase: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.phase == phase]

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        url = f"http://{LOCALHOST}:{self.port}/load"
        while self._next < self.total:
            i = self._next
            self._next += 1
            user = self.users[(i * 7919) % len(self.users)]
            phase = self.phase
            post = self.post_every and i % self.post_every == 0
            method = "POST" if post else "GET"
            headers = {"X-User-Id": user, "X-Phase": phase, "X-Req-Id": str(i)}
            if self.new_connections:
                headers["Connection"] = "close"
            body = f"body-{i}".encode() if post else None
            t0 = time.monotonic()
            try:
                async with session.request(method, url, headers=headers, data=body) as r:
                    payload = await r.read()
                    out = Outcome(
                        user,
                        method,
                        r.status,
                        r.headers.get("X-Backend"),
                        phase,
                        t0,
                        time.monotonic(),
                        rid=i,
                    )
                    if r.status != 200:
                        out.error = payload[:200].decode("latin-1")
                    elif post and payload != body:
                        out.status, out.error = None, f"wrong body {payload[:80]!r}"
            except (aiohttp.ClientError, TimeoutError) as e:
                out = Outcome(user, method, None, None, phase, t0, time.monotonic(), repr(e), rid=i)
            self.outcomes.append(out)

    async def run(self) -> None:
        conn = aiohttp.TCPConnector(limit=self.concurrency, force_close=self.new_connections)
        async with aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as s:
            await asyncio.gather(*(self._worker(s) for _ in range(self.concurrency)))

    def start(self) -> Load:
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def reached(self, n: int, deadline: float = 10.0) -> None:
        await eventually(
            lambda: len(self.outcomes) >= n or (self.task and self.task.done()),
            deadline=deadline,
            what=f"{n} requests answered",
        )
        assert len(self.outcomes) >= n, "the load ended early"

    async def finish(self, deadline: float = 30.0) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, deadline)
        assert len(self.outcomes) == self.total

    def describe_failures(self, limit: int = 5) -> str:
        f = self.failures
        return f"{len(f)} failed: " + "; ".join(
            f"{o.method} {o.user} -> {o.status} {o.error}" for o in f[:limit]
        )
