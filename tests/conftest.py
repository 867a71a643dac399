"""Fixtures, hooks and markers for the whole suite; the helpers they use are in tests/support/.

- ``backends``: ``await backends("a", "b")`` → started recording aiohttp backends
  (support/backends.py ``AioBackend``); ``raw_backend``: ``await raw_backend("id", script)``
  → a started byte-exact ``RawBackend``.
- ``proxy``: ``await proxy(backends, {"section": {...}})`` → an in-process proxy on an
  ephemeral port (support/proxy.py ``ProxyHandle``); ``proxy_process``:
  ``proxy_process(backends, overrides, workers=1)`` → ``stickyproxy run`` as a subprocess.
  Both stop what they started at teardown.

Test modules import helpers from ``support.<module>`` (tests/ is on ``sys.path``: this file is
a rootdir conftest outside any package).

Event loop: tests under tests/dataplane run on uvloop, the loop the proxy runs on in
production. pytest-asyncio 1.5 still honours a session-scoped ``event_loop_policy`` fixture
returning ``uvloop.EventLoopPolicy()``, but overriding that fixture is deprecated there (a
PytestDeprecationWarning on every test) and, defined here, it would switch the loop under
tests/context and the other suites as well. The replacement hook,
``pytest_asyncio_loop_factories``, is used instead, scoped to tests/dataplane.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from support.backends import Started
from support.proxy import InProcess, Processes

# ---------------------------------------------------------------------------------------
# which build of the hot path is under test (stickyproxy/compiled.py)


def pytest_report_header(config):
    from stickyproxy import compiled

    return f"stickyproxy data plane: {compiled.build()}"


def pytest_sessionstart(session):
    from stickyproxy import compiled

    problem = compiled.stale_problem()
    if problem:
        pytest.exit(problem, returncode=4)


# ---------------------------------------------------------------------------------------
# the event loop

_DATAPLANE = Path(__file__).parent / "dataplane"


def pytest_asyncio_loop_factories(config, item):
    """uvloop for tests/dataplane; elsewhere the loop the current policy makes, as before."""
    if _DATAPLANE in Path(str(item.path)).parents:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


# ---------------------------------------------------------------------------------------
# backends


@pytest.fixture
async def backends():
    """``await backends("a", "b", ...)`` → started AioBackends (stopped at teardown)."""
    started = Started()
    yield started.aio
    await started.stop()


@pytest.fixture
async def raw_backend():
    """``await raw_backend("id", script)`` → a started RawBackend (stopped at teardown)."""
    started = Started()
    yield started.raw
    await started.stop()


# ---------------------------------------------------------------------------------------
# the proxy


@pytest.fixture
async def proxy(tmp_path):
    """``await proxy(backends, {"section": {...}})`` → a started in-process ProxyHandle."""
    proxies = InProcess(tmp_path)
    yield proxies.start
    await proxies.stop()


@pytest.fixture
def proxy_process(tmp_path):
    """``proxy_process(backends, overrides, workers=1)`` → a started ProxyProcess.

    Its listen port is a fixed free port (workers share it with SO_REUSEPORT). Whatever is
    still running at teardown (the process group this fixture created) is killed.
    """
    procs = Processes(tmp_path)
    yield procs.spawn
    procs.kill()
