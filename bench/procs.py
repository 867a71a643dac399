"""Processes a benchmark starts: free loopback ports, servers that always stop, tools."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
PORT_POLL_INTERVAL = 0.05
CONNECT_TIMEOUT = 0.2
LOG_TAIL_LINES = 2
NOISE_CHARS = set("^~ ")

TOOL_PACKAGES = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "redis-server": "redis-server",
}


class StartError(Exception):
    """A server exited, or never accepted connections, while starting."""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on the loopback address a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        meaningful = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not set(line) <= NOISE_CHARS
        ]
        return " | ".join(meaningful[-lines:])

    def describe_exit(self) -> str:
        tail = self.log_tail()
        return f"exited with code {self.proc.returncode}" + (f": {tail}" if tail else "")

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever outlives STOP_TIMEOUT."""
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def spawn_server(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    stack: contextlib.ExitStack,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start `argv` in its own process group, logging to workdir/name.log, stopped when
    `stack` closes."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    server = Server(name, proc, log_path)
    stack.callback(server.stop)
    return server


def start_server(
    name: str,
    argv: Sequence[str],
    ports: Iterable[int],
    workdir: Path,
    stack: contextlib.ExitStack,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> Server:
    """Start `argv` in its own process group, stopped when `stack` closes; wait for `ports`."""
    server = spawn_server(name, argv, workdir, stack, env)
    wait_until_accepting(server, list(ports), timeout)
    return server


def wait_until_accepting(server: Server, ports: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not server.running:
            raise StartError(server.describe_exit())
        if all(accepts(port) for port in ports):
            return
        if time.monotonic() > deadline:
            tail = server.log_tail()
            raise StartError(
                f"did not accept connections on port(s) "
                f"{', '.join(map(str, ports))} within {timeout:g}s" + (f": {tail}" if tail else "")
            )
        time.sleep(PORT_POLL_INTERVAL)


def missing_tools(tools: Iterable[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def _privileged(argv: list[str]) -> list[str]:
    return argv if os.geteuid() == 0 else ["sudo", *argv]


def install_command(tools: Sequence[str]) -> str:
    packages = [TOOL_PACKAGES[tool] for tool in tools]
    update = " ".join(_privileged(["apt-get", "update"]))
    install = " ".join(_privileged(["apt-get", "install", "-y", *packages]))
    return f"{update} && {install}"


def install_tools(tools: Sequence[str]) -> None:
    packages = [TOOL_PACKAGES[tool] for tool in tools]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(_privileged(["apt-get", "update"]), check=True, env=env)
    subprocess.run(_privileged(["apt-get", "install", "-y", *packages]), check=True, env=env)


def ensure_installed(tools: Sequence[str], install: bool) -> bool:
    """True when every tool is on the PATH, installing the missing ones with apt-get if
    `install`; otherwise print how to install them."""
    missing = missing_tools(tools)
    if not missing:
        return True
    if not install:
        print(
            f"missing: {', '.join(missing)}. Install with:\n  {install_command(missing)}\n"
            "or run again with --install.",
            file=sys.stderr,
        )
        return False
    print(f"installing {', '.join(missing)}", flush=True)
    try:
        install_tools(missing)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"install failed: {e}", file=sys.stderr)
        return False
    still = missing_tools(missing)
    if still:
        print(f"still missing after install: {', '.join(still)}", file=sys.stderr)
    return not still


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version (some print it on stderr, or exit 1)."""
    try:
        out = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"
