"""A redis-server of the test's own on a free loopback port (never the shared one on 6379),
with no persistence, and its command counters for tests that count what an app sent."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from support.net import LOCALHOST, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# Longest a server may take to answer its first PING.
START_DEADLINE = 10.0
# A free port can be taken by someone else before redis-server binds it; a few tries.
PORT_TRIES = 5
# Commands a test sends itself to look at Redis, not the app's.
BOOKKEEPING = frozenset({"info", "ping", "hello", "client|setinfo", "flushall"})


def installed() -> bool:
    return Path(REDIS_SERVER).exists()


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(PORT_TRIES):
            self.port = free_port()
            assert self.port != 6379
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    LOCALHOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--protected-mode",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            end = time.monotonic() + START_DEADLINE
            while self.proc.poll() is None:
                try:
                    with self.client() as c:
                        if c.ping():
                            return self
                except redis.RedisError:
                    pass
                assert time.monotonic() < end, "redis-server did not answer in time"
                time.sleep(0.02)
            self.stop()  # exited at start: most likely the port was taken
        raise AssertionError(f"redis-server did not start on any of {PORT_TRIES} ports")

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=LOCALHOST, port=self.port, socket_timeout=2, socket_connect_timeout=2
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def commandstats(self) -> dict[str, int]:
        with self.client() as c:
            info = c.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in info.items()}

    def calls_since(self, before: dict[str, int]) -> dict[str, int]:
        """Commands the apps sent since ``before`` (the test's own bookkeeping left out)."""
        after = self.commandstats()
        return {
            n: c - before.get(n, 0)
            for n, c in after.items()
            if c != before.get(n, 0) and n not in BOOKKEEPING
        }
