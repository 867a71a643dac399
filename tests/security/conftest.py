"""Fixtures for the security suite (issue 8; docs/THREAT_MODEL.md); its judges are in
judges.py.

- ``rig``: a proxy (tests/conftest.py ``proxy``) in front of a strict raw backend whose
  upstream connection is already pooled;
- ``redis_server``: a redis-server of the test's own on a free port (never 6379).

The proxy tests run on uvloop (the production loop), like tests/dataplane.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from support.redis import RedisServer
from support.redis import installed as redis_installed

from .judges import Rig, strict_responder

_HERE = Path(__file__).parent
# Modules whose tests run on the default asyncio loop (the context library's own tests do).
_ASYNCIO_MODULES = frozenset({"test_context_isolation.py"})


def pytest_asyncio_loop_factories(config, item):
    path = Path(str(item.path))
    if _HERE in path.parents and path.name not in _ASYNCIO_MODULES:
        return {"uvloop": uvloop.new_event_loop}
    return None  # the next implementation (tests/conftest.py) decides


@pytest.fixture
async def rig(raw_backend, proxy):
    """A Rig with a strict backend and one pooled upstream connection (warmed)."""
    be = await raw_backend("a", strict_responder())
    p = await proxy(
        [be], {"limits": {"max_body": 1 << 20}, "timeouts": {"response": "1s", "body_idle": "1s"}}
    )
    r = Rig(p, be)
    await r.warm()
    return r


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_installed():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
