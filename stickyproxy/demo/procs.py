"""The demo's child processes: each in its own process group, so stopping one stops
everything it started, with bounded waits.

None of them outlives the demo, however the demo ends. A clean end stops each one (SIGTERM,
then SIGKILL). A demo that crashes or is killed cannot, so two things act without it: on
Linux each child asks the kernel to SIGKILL it when the demo dies (prctl(2)
PR_SET_PDEATHSIG, armed between fork and exec), and a watchdog process (``watchdog.py``),
told each child's process group, kills those groups and removes the demo's temporary
directory when the demo's end of a pipe closes without a goodbye.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import aiohttp

# How often start-up waits poll a child.
POLL_INTERVAL = 0.05
# Last bytes of a child's log shown when it fails to start.
LOG_TAIL = 1500


class DemoError(Exception):
    """Something the demo cannot go on without; the message says what to do."""


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None when it is free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
    return None


# prctl(2) option: the signal this process gets when the thread that forked it exits.
PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, before any fork: the child between fork and exec only calls it.
_PRCTL = _load_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the calling thread (the demo's
    event loop thread, which lives as long as the demo) exits; None where prctl is missing.
    If the demo already died between fork and prctl, the child exits at once."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


class Child:
    """One subprocess in a new session (its own process group), output appended to a log,
    killed by the kernel if the demo dies first (``die_with_parent``). ``on_start`` is told
    each new process group (the watchdog's list)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.on_start = on_start
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped_on_purpose = False
        self.exit_reported = False
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - held for the child's lifetime
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        if self.on_start is not None:
            self.on_start(self.proc.pid)
        self.stopped_on_purpose = False
        self.exit_reported = False

    def exit_status(self) -> str:
        rc = self.proc.returncode if self.proc is not None else None
        if rc is None:
            return "running"
        if rc < 0:
            try:
                return f"signal {signal.Signals(-rc).name}"
            except ValueError:
                return f"signal {-rc}"
        return f"exit code {rc}"

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once: the crash a failover is for."""
        self.stopped_on_purpose = True
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass

    async def stop(self, grace: float) -> None:
        """SIGTERM the group, SIGKILL whatever is left after ``grace`` seconds, reap."""
        if self.proc is None:
            return
        self.stopped_on_purpose = True
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            end = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < end:
                await asyncio.sleep(POLL_INTERVAL)
        self._signal_group(signal.SIGKILL)
        if self.proc.poll() is None:
            try:
                await asyncio.to_thread(self.proc.wait, 2)
            except subprocess.TimeoutExpired:
                pass
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()[-LOG_TAIL:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()

    def failed_to_start(self, what: str) -> DemoError:
        tail = self.log_tail()
        detail = f"\n--- last lines of {self.log_path} ---\n{tail}" if tail else ""
        return DemoError(f"{self.name} {what}{detail}")


async def wait_redis(child: Child, port: int, deadline: float) -> None:
    """Until redis-server answers PING on 127.0.0.1:``port``."""
    end = time.monotonic() + deadline
    while True:
        if not child.running:
            raise child.failed_to_start(f"exited at start-up ({child.exit_status()})")
        try:
            async with asyncio.timeout(1):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(b"PING\r\n")
                    if await reader.readline() == b"+PONG\r\n":
                        return
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            pass
        if time.monotonic() > end:
            raise child.failed_to_start(f"did not answer PING within {deadline:g}s")
        await asyncio.sleep(POLL_INTERVAL)


async def wait_http_ok(
    child: Child, session: aiohttp.ClientSession, url: str, deadline: float
) -> None:
    """Until ``url`` answers 200."""
    end = time.monotonic() + deadline
    while True:
        if not child.running:
            raise child.failed_to_start(f"exited at start-up ({child.exit_status()})")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        if time.monotonic() > end:
            raise child.failed_to_start(f"did not answer {url} within {deadline:g}s")
        await asyncio.sleep(POLL_INTERVAL)


def python_env() -> dict[str, str]:
    """The environment for the demo's Python children: they import this very copy of
    stickyproxy (a checkout's, when the demo runs from one), whatever their directory."""
    from .. import compiled

    env = dict(os.environ)
    if compiled.in_source_tree():
        root = str(compiled.PACKAGE_DIR.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shop_argv(port: int, node_id: str, redis_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stickyproxy.demo.shop",
        "--port",
        str(port),
        "--node-id",
        node_id,
        "--redis",
        redis_url,
    ]
