"""`stickyproxy run` takes SIGHUP and SIGTERM from the moment its port accepts connections:
the handlers are installed before the listener opens, so a supervisor that signals as soon as
it sees the port does not kill the proxy undrained (exit -15 / -1)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest

from support.http import Client, http_request

pytestmark = pytest.mark.slow

DEADLINE = 20.0  # seconds for a cold interpreter to import and bind


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


async def _signal_when_listening(pp, sig: int) -> None:
    end = time.monotonic() + DEADLINE
    while not _accepting(pp.port):
        assert pp.proc.poll() is None, pp.output()
        assert time.monotonic() < end, "did not start listening"
        await asyncio.sleep(0.005)
    pp.signal(sig)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_at_first_accept_is_a_reload_not_a_death(backends, proxy_process, workers):
    (a,) = await backends("a")
    pp = proxy_process([a], workers=workers)
    await _signal_when_listening(pp, signal.SIGHUP)
    await pp.wait_ready()
    c = await Client.connect(pp.port)
    try:
        c.send(http_request("GET", "/x", headers={"X-User-Id": "u"}))
        assert (await c.response()).status == 200
    finally:
        c.close()
    pp.signal(signal.SIGTERM)
    assert await pp.wait_exit() == 0, pp.output()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_at_first_accept_stops_cleanly(backends, proxy_process, workers):
    (a,) = await backends("a")
    pp = proxy_process([a], workers=workers)
    await _signal_when_listening(pp, signal.SIGTERM)
    assert await pp.wait_exit() == 0, pp.output()
