"""Fixtures for the examples' tests: a redis-server of the test's own (support/redis.py)
and shop instances served in process on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from support.net import IO_TIMEOUT, eventually  # noqa: F401  (re-exported to test_shop.py)
from support.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from shop.app import create_app  # noqa: E402 (after the sys.path entry above)
from shop.settings import Settings  # noqa: E402

# Longest a test waits for a server it started to answer.
START_DEADLINE = 10.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
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
