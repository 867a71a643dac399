"""The proxy under test, started the two ways users start it.

- In process: ``InProcess.start(backends, overrides)`` writes a config file, starts a
  ``Service`` on an ephemeral port and returns a ``ProxyHandle`` (its config, port, ring,
  and one-shot request helpers); ``stop`` stops every one still running.
- As a subprocess: ``Processes.spawn(backends, overrides, workers=N)`` runs
  ``stickyproxy run`` on a fixed free port (workers share it with SO_REUSEPORT) in a process
  group of its own, with its output in a log file; ``kill`` kills what is still running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stickyproxy.config import Config, loads
from stickyproxy.control.server import Service
from support.config import build_toml, ring_of
from support.http import Client, Response, http_request
from support.net import IO_TIMEOUT, free_port

# ---------------------------------------------------------------------------------------
# in process


@dataclass
class ProxyHandle:
    svc: Service
    path: Path
    toml: str

    @property
    def config(self) -> Config:
        return self.svc.config

    @property
    def port(self) -> int:
        return self.svc.proxy.port

    @property
    def fingerprint(self) -> str:
        return ring_of(self.config).fingerprint

    def pref(self, key: str) -> list[str]:
        return ring_of(self.config).preference(key)

    async def client(self) -> Client:
        return await Client.connect(self.port)

    async def exchange(
        self, raw: bytes, *, head: bool = False, timeout: float = IO_TIMEOUT
    ) -> Response:
        """Send ``raw`` on a new connection, read one response, close."""
        c = await self.client()
        try:
            c.send(raw)
            return await c.response(head=head, timeout=timeout)
        finally:
            c.close()

    async def get(
        self,
        target: str = "/",
        *,
        user: str | None = None,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        body: bytes | None = None,
        timeout: float = IO_TIMEOUT,
    ) -> Response:
        h = dict(headers or {})
        if user is not None:
            h["X-User-Id"] = user
        return await self.exchange(
            http_request(method, target, headers=h, body=body),
            head=method == "HEAD",
            timeout=timeout,
        )


class InProcess:
    """In-process proxies whose config files go to ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[Service] = []

    async def start(
        self,
        backend_list: list[Any],
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        name: str = "proxy.toml",
    ) -> ProxyHandle:
        text = build_toml(backend_list, overrides)
        path = self.directory / name
        path.write_text(text)
        svc = Service(loads(text, str(path)), str(path))
        await svc.start()
        self.started.append(svc)
        return ProxyHandle(svc, path, text)

    async def stop(self) -> None:
        for svc in self.started:
            if not svc.stopped.is_set():
                await asyncio.wait_for(svc.stop(), 10)


# ---------------------------------------------------------------------------------------
# as a subprocess


class ProxyProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the proxy accepts a connection and answers a request."""
        end = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"proxy exited early:\n{self.output()}"
            try:
                c = await Client.connect(self.port, timeout=1)
                try:
                    c.send(http_request("GET", "/__ready", headers={"X-User-Id": "ready"}))
                    r = await c.response(timeout=2)
                    if r.status < 500:
                        return
                finally:
                    c.close()
            except (OSError, AssertionError, TimeoutError):
                pass
            if time.monotonic() > end:
                raise AssertionError(f"proxy not ready in {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"proxy did not exit in {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def status_field(self, name: str, pid: int | None = None) -> int:
        """A kB field of /proc/PID/status (VmHWM, VmRSS)."""
        with open(f"/proc/{pid or self.pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        raise KeyError(name)


class Processes:
    """``stickyproxy run`` subprocesses whose config and log files go to ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.procs: list[ProxyProcess] = []

    def spawn(
        self,
        backend_list: list[Any],
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        workers: int = 1,
        args: tuple[str, ...] = (),
    ) -> ProxyProcess:
        port = free_port()
        ov = {k: dict(v) for k, v in (overrides or {}).items()}
        ov.setdefault("listen", {})["port"] = port
        text = build_toml(backend_list, ov)
        n = len(self.procs)
        path = self.directory / f"proxy-{n}.toml"
        path.write_text(text)
        log = self.directory / f"proxy-{n}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stickyproxy.cli",
                    "run",
                    "-c",
                    str(path),
                    "--workers",
                    str(workers),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        p = ProxyProcess(proc, port, log)
        self.procs.append(p)
        return p

    def kill(self) -> None:
        """SIGKILL the process group of every one still running."""
        for p in self.procs:
            if p.proc.poll() is None:
                try:
                    os.killpg(p.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.proc.wait(10)
