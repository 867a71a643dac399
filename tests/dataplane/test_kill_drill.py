"""Issue 15: a backend killed -9 under load, with its in-flight requests and pooled
connections, and restarted: no idempotent request fails, and a POST that reached it is not
sent twice. Real backend processes, 24 keep-alive clients, health as users configure it
(every 500 ms, fall 2, rise 1); retry settings are the defaults."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from support.http import Client, http_request
from support.net import LOCALHOST, free_port

pytestmark = pytest.mark.slow

APP = Path(__file__).with_name("killable_backend.py")
CLIENTS = 24
USERS = 500
# the drill: load for LOAD_S seconds; one backend killed at KILL_AT, restarted at RESTART_AT
LOAD_S, KILL_AT, RESTART_AT = 4.0, 1.0, 2.0
HEALTH = {
    "enabled": True,
    "interval": "500ms",
    "fall": 2,
    "rise": 1,
    "timeout": "300ms",
    "path": "/healthz",
}


class BackendProcess:
    def __init__(self, bid: str, port: int, log: Path):
        self.id, self.port, self.log = bid, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), self.id, str(self.port), str(self.log)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        end = time.monotonic() + 20
        while True:
            try:
                _, w = await asyncio.open_connection(LOCALHOST, self.port)
                w.close()
                return
            except OSError:
                assert self.proc.poll() is None, f"backend {self.id} exited"
                assert time.monotonic() < end, f"backend {self.id} did not start"
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def attempts(self, path: str) -> int:
        try:
            lines = self.log.read_text().splitlines()
        except OSError:
            return 0
        return sum(1 for ln in lines if ln.split(" ")[1:2] == [path])


@pytest.fixture
async def fleet(tmp_path):
    made = [BackendProcess(f"app-{i}", free_port(), tmp_path / f"app-{i}.log") for i in (1, 2, 3)]
    for b in made:
        await b.start()
    yield made
    for b in made:
        if b.proc is not None and b.proc.poll() is None:
            b.kill()


async def _load(port: int, method: str, stop_at: float, statuses: Counter, failures: list):
    rng = random.Random()
    c: Client | None = None
    while time.monotonic() < stop_at:
        if c is None:
            c = await Client.connect(port)
        user = f"user-{rng.randrange(USERS)}"
        c.send(http_request(method, f"/u/{user}", headers={"X-User-Id": user}))
        try:
            r = await c.response(head=method == "HEAD", timeout=10)
        except (AssertionError, ConnectionError, TimeoutError) as e:
            statuses["no-response"] += 1
            failures.append(f"{method} {user}: {e!r}")
            c.close()
            c = None
            continue
        statuses[r.status] += 1
        if r.status != 200:
            failures.append(f"{method} {user}: {r.status} {r.body[:100]!r}")
        if r.wants_close:
            c.close()
            c = None
    if c is not None:
        c.close()


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_no_idempotent_request_fails_when_a_backend_is_killed_under_load(
    fleet, proxy, method
):
    p = await proxy(fleet, {"health": HEALTH, "admin": {"enabled": True, "port": 0}})
    victim = fleet[1]
    statuses: Counter = Counter()
    failures: list[str] = []
    t0 = time.monotonic()
    load = [
        asyncio.create_task(_load(p.port, method, t0 + LOAD_S, statuses, failures))
        for _ in range(CLIENTS)
    ]
    await asyncio.sleep(KILL_AT)
    inflight = p.svc.proxy.upstreams[victim.id].inflight
    pooled = len(p.svc.proxy.upstreams[victim.id].idle)
    victim.kill()
    await asyncio.sleep(RESTART_AT - KILL_AT)
    await victim.start()
    await asyncio.gather(*load)
    # the kill hit a backend that was busy: requests in flight or connections pooled
    assert inflight + pooled > 0, (inflight, pooled)
    assert sum(statuses.values()) > 200, statuses
    assert failures == [], (statuses, failures[:10])
    # and the restarted backend got its users back (rise 1, every 500 ms)
    end = time.monotonic() + 3
    while not p.svc.table.states[victim.id].usable(time.monotonic()):
        assert time.monotonic() < end, "the restarted backend was not taken back"
        await asyncio.sleep(0.05)


async def test_post_that_reached_a_killed_backend_is_not_retried(fleet, proxy):
    """A POST is sent, the backend dies before answering: 502, and it was attempted once,
    at that backend only (RFC 9110 §9.2.2: not idempotent, never replayed)."""
    p = await proxy(fleet, {"health": HEALTH})
    victim = fleet[0]
    user = next(f"u{i}" for i in range(1000) if p.pref(f"u{i}")[0] == victim.id)
    c = await Client.connect(p.port)
    c.send(http_request("POST", "/slow", headers={"X-User-Id": user}, body=b"pay once"))
    end = time.monotonic() + 5
    while victim.attempts("/slow") == 0:
        assert time.monotonic() < end, "the POST never reached its backend"
        await asyncio.sleep(0.02)
    victim.kill()
    r = await c.response(timeout=5)
    c.close()
    assert r.status == 502, r.body
    assert victim.attempts("/slow") == 1
    assert [b.attempts("/slow") for b in fleet[1:]] == [0, 0]
