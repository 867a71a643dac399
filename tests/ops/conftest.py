"""Fixtures for the operations suite: an in-process proxy with its admin API, a parsed view
of /metrics, backends whose health check the test scripts, a bounded load loop, and log
capture that does not depend on how an earlier test left the ``stickyproxy`` loggers.

Everything runs on 127.0.0.1 with real sockets (tests/conftest.py provides the backends,
the in-process ``proxy`` factory and the raw client); nothing here sleeps to synchronise:
waits are ``eventually()`` polls with deadlines.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    LOCALHOST,
    ProxyHandle,
    Recorded,
    build_toml,
    echo_handler,
    eventually,
    ring_of,
)
from prometheus_client.parser import text_string_to_metric_families

# ---------------------------------------------------------------------------------------
# configuration helpers

ADMIN = {"enabled": True, "host": LOCALHOST, "port": 0}


def merged(*layers: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Per-section merge of override dicts (later layers win key by key)."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in (layer or {}).items():
            out.setdefault(section, {}).update(values)
    return out


def health_cfg(**kw: Any) -> dict[str, Any]:
    """[health] for fast, deterministic checks: 50 ms apart, no jitter."""
    base = {"enabled": True, "path": "/healthz", "interval": "50ms", "timeout": "50ms",
            "rise": 2, "fall": 3, "jitter": 0.0}
    base.update(kw)
    return base


def keys_where(pref: Callable[[str], list[str]], pred: Callable[[list[str]], bool],
               n: int = 1, prefix: str = "user") -> list[str]:
    """The first ``n`` keys ``prefix-0, prefix-1, ...`` whose preference list satisfies ``pred``."""
    out = []
    for i in range(200_000):
        k = f"{prefix}-{i}"
        if pred(pref(k)):
            out.append(k)
            if len(out) == n:
                return out
    raise AssertionError("no such key")


# ---------------------------------------------------------------------------------------
# /metrics

class Metrics:
    """A parsed Prometheus exposition: ``value(name, **labels)`` with the exact label set."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, default: float | None = 0.0, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())), default)

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def by(self, name: str, label: str) -> dict[str, float]:
        """{value of ``label``: sample} for a family with that one label."""
        return {dict(labels)[label]: v for labels, v in self.series(name).items()}

    def total(self, name: str, **labels: str) -> float:
        """Sum over the series of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for ls, v in self.series(name).items() if want <= set(ls))


# ---------------------------------------------------------------------------------------
# the in-process proxy with its admin API

@dataclass
class AdminReply:
    status: int
    headers: Any
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class OpsProxy:
    """A ProxyHandle plus what operating it needs: admin calls, metrics, config rewrites."""

    def __init__(self, handle: ProxyHandle, backends: list[Any],
                 overrides: dict[str, dict[str, Any]]):
        self.h = handle
        self.svc = handle.svc
        self.path = handle.path
        self.backends = list(backends)
        self.overrides = overrides
        self._session: aiohttp.ClientSession | None = None
        self._ring: Any = None
        self._ring_for: Any = None

    # the data plane
    @property
    def port(self) -> int:
        return self.h.port

    def pref(self, key: str) -> list[str]:
        """The key's preference list under the running configuration."""
        cfg = self.svc.config
        if self._ring_for is not cfg:
            self._ring, self._ring_for = ring_of(cfg), cfg
        return self._ring.preference(key)

    @property
    def fingerprint(self) -> str:
        return self.h.fingerprint

    async def get(self, target: str = "/", **kw: Any):
        return await self.h.get(target, **kw)

    # the admin API
    @property
    def admin_port(self) -> int:
        assert self.svc.admin is not None, "admin API not enabled"
        return self.svc.admin.port

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def admin(self, method: str, path: str, *, token: str | None = None,
                    headers: dict[str, str] | None = None) -> AdminReply:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        s = await self.session()
        async with s.request(method, f"http://{LOCALHOST}:{self.admin_port}{path}",
                             headers=h) as r:
            return AdminReply(r.status, r.headers, await r.text())

    async def metrics(self) -> Metrics:
        r = await self.admin("GET", "/metrics")
        assert r.status == 200, r.text
        return Metrics(r.text)

    async def backend_view(self) -> dict[str, dict[str, Any]]:
        r = await self.admin("GET", "/backends")
        assert r.status == 200, r.text
        return {b["id"]: b for b in r.json()["backends"]}

    async def route(self, key: str) -> dict[str, Any]:
        r = await self.admin("GET", f"/route?key={key}")
        assert r.status == 200, r.text
        return r.json()

    # the configuration file
    def rewrite(self, backends: list[Any] | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> str:
        """Write a new config to the file the proxy was started from (not applied yet)."""
        if backends is not None:
            self.backends = list(backends)
        if overrides is not None:
            self.overrides = merged(self.overrides, overrides)
        text = build_toml(self.backends, self.overrides)
        self.path.write_text(text)
        return text

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@pytest.fixture
async def ops_proxy(proxy):
    """``await ops_proxy(backends, overrides)`` → a started OpsProxy with the admin API on an
    ephemeral loopback port (unless the overrides disable it)."""
    made: list[OpsProxy] = []

    async def make(backend_list: list[Any], overrides: dict[str, dict[str, Any]] | None = None,
                   *, name: str = "proxy.toml") -> OpsProxy:
        ov = merged({"admin": ADMIN}, overrides)
        handle = await proxy(backend_list, ov, name=name)
        op = OpsProxy(handle, backend_list, ov)
        made.append(op)
        return op

    yield make
    for op in made:
        await op.close()


# ---------------------------------------------------------------------------------------
# backends whose health check the test drives

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
        self.times: list[float] = []          # when each check arrived (monotonic)

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


def simulate_rise_fall(served: list[int | str], rise: int, fall: int,
                       ok: Callable[[int | str], bool] = lambda o: o == 200
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


# ---------------------------------------------------------------------------------------
# logs

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


@pytest.fixture
def attach_log():
    """``attach_log("stickyproxy.control.health", probe)`` → a Snapshotting handler on that logger
    (level INFO or lower for the test; removed and restored at teardown)."""
    added: list[tuple[logging.Logger, logging.Handler, int]] = []

    def attach(name: str, probe: Callable[[], Any] = lambda: None,
               level: int = logging.INFO) -> Snapshotting:
        logger = logging.getLogger(name)
        h = Snapshotting(probe)
        added.append((logger, h, logger.level))
        logger.addHandler(h)
        logger.setLevel(level)
        return h

    yield attach
    for logger, h, level in reversed(added):
        logger.removeHandler(h)
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def _no_long_gc_pauses():
    """A full collection of this process's heap stalls the event loop for 40-100 ms, longer
    than the 50 ms health checks these tests use (a check would time out spuriously).
    Objects that exist before the test are frozen out of collection for its duration."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _propagating_loggers():
    """caplog listens on the root logger: make sure the proxy's loggers reach it even if
    something in this process ran ``setup_logging`` (which stops propagation)."""
    names = ("stickyproxy", "stickyproxy.access", "stickyproxy.control.health")
    saved = {n: logging.getLogger(n).propagate for n in names}
    for n in names:
        logging.getLogger(n).propagate = True
    yield
    for n, v in saved.items():
        logging.getLogger(n).propagate = v


# ---------------------------------------------------------------------------------------
# a bounded load loop

@dataclass
class Outcome:
    user: str
    method: str
    status: int | None         # None: the request failed at the HTTP level
    backend: str | None        # the backend that answered (its X-Backend)
    phase: str                 # the test's phase when the request was sent
    sent: float
    done: float
    error: str = ""
    rid: int = -1              # the request's X-Req-Id


class Load:
    """``concurrency`` workers sending ``total`` requests (no more) for ``users`` over
    keep-alive connections, each tagged with the current ``phase`` (``X-Phase``) so a
    backend's record tells when the request was sent. Every third request is a POST with a
    body (not retryable after it was sent), the rest GETs."""

    def __init__(self, port: int, users: list[str], *, total: int = 600, concurrency: int = 8,
                 post_every: int = 3, timeout: float = 5.0, new_connections: bool = False):
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
                    out = Outcome(user, method, r.status, r.headers.get("X-Backend"), phase,
                                  t0, time.monotonic(), rid=i)
                    if r.status != 200:
                        out.error = payload[:200].decode("latin-1")
                    elif post and payload != body:
                        out.status, out.error = None, f"wrong body {payload[:80]!r}"
            except (aiohttp.ClientError, TimeoutError) as e:
                out = Outcome(user, method, None, None, phase, t0, time.monotonic(), repr(e),
                              rid=i)
            self.outcomes.append(out)

    async def run(self) -> None:
        conn = aiohttp.TCPConnector(limit=self.concurrency, force_close=self.new_connections)
        async with aiohttp.ClientSession(
                connector=conn, timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:
            await asyncio.gather(*(self._worker(s) for _ in range(self.concurrency)))

    def start(self) -> Load:
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def reached(self, n: int, deadline: float = 10.0) -> None:
        await eventually(lambda: len(self.outcomes) >= n or (self.task and self.task.done()),
                         deadline=deadline, what=f"{n} requests answered")
        assert len(self.outcomes) >= n, "the load ended early"

    async def finish(self, deadline: float = 30.0) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, deadline)
        assert len(self.outcomes) == self.total

    def describe_failures(self, limit: int = 5) -> str:
        f = self.failures
        return f"{len(f)} failed: " + "; ".join(
            f"{o.method} {o.user} -> {o.status} {o.error}" for o in f[:limit])


@pytest.fixture
def load_loops():
    """``load_loops(port, users, ...)`` → a Load; any still running at teardown is cancelled."""
    made: list[Load] = []

    def make(port: int, users: list[str], **kw: Any) -> Load:
        ld = Load(port, users, **kw)
        made.append(ld)
        return ld

    yield make
    for ld in made:
        if ld.task is not None and not ld.task.done():
            ld.task.cancel()


# ---------------------------------------------------------------------------------------
# processes

def socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _tcp_rows():
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            yield parts[1], parts[2], parts[3], parts[9]      # local, remote, state, inode


def listening_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    inodes = socket_inodes(pid)
    return any(state == "0A" and inode in inodes and int(local.split(":")[1], 16) == port
               for local, _, state, inode in _tcp_rows())


def listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (SO_REUSEPORT: one per worker)."""
    return sum(1 for local, _, state, _ in _tcp_rows()
               if state == "0A" and int(local.split(":")[1], 16) == port)


def established_to(pid: int, ports: set[int]) -> int:
    """TCP connections process ``pid`` holds to 127.0.0.1 on one of ``ports``."""
    inodes = socket_inodes(pid)
    return sum(1 for _, remote, state, inode in _tcp_rows()
               if state == "01" and inode in inodes and int(remote.split(":")[1], 16) in ports)


__all__ = [
    "ADMIN",
    "AdminReply",
    "HealthScript",
    "Load",
    "Metrics",
    "OpsProxy",
    "Outcome",
    "Snapshotting",
    "echo_handler",
    "established_to",
    "health_cfg",
    "keys_where",
    "listeners",
    "listening_on",
    "merged",
    "simulate_rise_fall",
    "user_requests",
    "with_health",
]
