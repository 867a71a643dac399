"""Fixtures for the examples' tests: a redis-server of the test's own on a free loopback port
(never the shared one on 6379) and shop instances served in process on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from conftest import eventually  # noqa: F401  (re-exported to the examples' tests)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from shop.app import create_app
from shop.settings import Settings

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# Longest a fixture waits for a server to answer, and any single wait in a test.
START_DEADLINE = 10.0
IO_TIMEOUT = 5.0
# Commands a test sends itself to look at Redis, not the app's.
BOOKKEEPING = frozenset({"info", "ping", "hello", "client|setinfo", "flushall"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + START_DEADLINE
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.RedisError:
                pass
            assert self.proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < end, "redis-server did not answer in time"
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def commandstats(self) -> dict[str, int]:
        with self.client() as c:
            info = c.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in info.items()}

    def calls_since(self, before: dict[str, int]) -> dict[str, int]:
        """Commands the apps sent since ``before`` (the test's own bookkeeping left out)."""
        after = self.commandstats()
        return {n: c - before.get(n, 0) for n, c in after.items()
                if c != before.get(n, 0) and n not in BOOKKEEPING}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


ShopFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def shop(redis_server: RedisServer) -> AsyncIterator[ShopFactory]:
    """``client = await shop("app-1", stateless=False, **settings)``: an instance on a free
    loopback port and a client for it; all closed at teardown."""
    clients: list[TestClient] = []

    async def make(node_id: str = "app-1", **kwargs: Any) -> TestClient:
        settings = Settings(port=0, node_id=node_id, redis_url=redis_server.url, **kwargs)
        client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def as_user(user: str) -> dict[str, str]:
    """The header the proxy sets on every request it forwards."""
    return {"X-Sticky-Key": user}
