"""Fixtures for the operations suite: an in-process proxy with its admin API
(support/admin.py), log capture (support/logs.py), bounded load loops (support/load.py), and
the process-wide settings these tests need (no long GC pauses, propagating loggers).

Everything runs on 127.0.0.1 with real sockets; nothing here sleeps to synchronise: waits
are ``eventually()`` polls with deadlines.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import pytest

from support.admin import ADMIN, OpsProxy
from support.config import merged
from support.load import Load
from support.logs import Snapshotting


@pytest.fixture
async def ops_proxy(proxy):
    """``await ops_proxy(backends, overrides)`` → a started OpsProxy with the admin API on an
    ephemeral loopback port (unless the overrides disable it)."""
    made: list[OpsProxy] = []

    async def make(
        backend_list: list[Any],
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        name: str = "proxy.toml",
    ) -> OpsProxy:
        ov = merged({"admin": ADMIN}, overrides)
        handle = await proxy(backend_list, ov, name=name)
        op = OpsProxy(handle, backend_list, ov)
        made.append(op)
        return op

    yield make
    for op in made:
        await op.close()


@pytest.fixture
def attach_log():
    """``attach_log("stickyproxy.control.health", probe)`` → a Snapshotting handler on that logger
    (level INFO or lower for the test; removed and restored at teardown)."""
    added: list[tuple[logging.Logger, logging.Handler, int]] = []

    def attach(
        name: str, probe: Callable[[], Any] = lambda: None, level: int = logging.INFO
    ) -> Snapshotting:
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
