"""The demo's child processes: each in its own process group, so stopping one stops
everything it started, with bounded waits."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def find_examples() -> Path | None:
    """``examples/`` holding the shop app: beside the package (a checkout or an editable
    install), else under the current directory."""
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = base / "examples"
        if (candidate / "shop" / "__main__.py").is_file():
            return candidate
    return None


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


class Child:
    """One subprocess in a new session (its own process group), output appended to a log."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
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
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                     start_new_session=True)
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


async def wait_http_ok(child: Child, session: aiohttp.ClientSession, url: str,
                       deadline: float) -> None:
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


def python_env(examples: Path) -> dict[str, str]:
    """The environment for ``python -m shop``: examples/ first on the module path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(examples), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shop_argv(port: int, node_id: str, redis_url: str) -> list[str]:
    return [sys.executable, "-m", "shop", "--port", str(port), "--node-id", node_id,
            "--redis", redis_url]
