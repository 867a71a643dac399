"""Fixtures: a real dnsmasq on a free loopback port whose records a test changes, a UDP
socket that never answers, and a relay that delays a real server's answers.

dnsmasq re-reads ``--addn-hosts`` files on SIGHUP (A/AAAA and their PTR records), but not
``srv-host`` lines of its ``--conf-file``: SRV changes restart it on the same port.
``local=/test/`` and ``local=/127.in-addr.arpa/`` make it answer NXDOMAIN for names it does
not hold there (it has no upstream), as an authoritative server would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from stickyproxy.config import Backend
from stickyproxy.discovery import Source

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
# How long a fixture waits for dnsmasq to answer after a start or a SIGHUP.
START_DEADLINE = 5.0
LOCALHOST = "127.0.0.1"
# Upper bound on any wait for a discovered change in these tests (a hang fails).
CHANGE_DEADLINE = 8.0


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOCALHOST, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((LOCALHOST, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def ask(port: int, name: str, rdtype: str, timeout: float = 0.5) -> dns.message.Message:
    return dns.query.udp(
        dns.message.make_query(name, rdtype), LOCALHOST, port=port, timeout=timeout
    )


class Dnsmasq:
    """One dnsmasq process; ``srv`` and ``hosts`` hold its records, ``apply()`` serves them."""

    def __init__(self, workdir: Path, port: int, ttl: int = 1) -> None:
        self.dir = workdir
        self.port = port
        self.ttl = ttl
        self.conf = workdir / "dnsmasq.conf"
        self.hosts_file = workdir / "hosts"
        self.srv: list[tuple[str, str, int, int, int]] = []  # (name, target, port, prio, weight)
        self.hosts: list[tuple[str, str]] = []  # (address, name)
        self.extra: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._conf_text = ""

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def _write(self) -> str:
        lines = [
            "local=/test/",
            "local=/127.in-addr.arpa/",
            f"local-ttl={self.ttl}",
            f"addn-hosts={self.hosts_file}",
        ]
        lines += [f"srv-host={n},{t},{p},{pr},{w}" for n, t, p, pr, w in self.srv]
        lines += self.extra
        text = "\n".join(lines) + "\n"
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{a} {n}\n" for a, n in self.hosts))
        os.replace(tmp, self.hosts_file)
        return text

    def start(self) -> None:
        self._conf_text = self._write()
        self.conf.write_text(self._conf_text)
        self.proc = subprocess.Popen(
            [
                DNSMASQ,
                "-k",
                f"--port={self.port}",
                f"--listen-address={LOCALHOST}",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--conf-file={self.conf}",
                "--pid-file=",
                "--user=root",
                f"--log-facility={self.dir / 'log'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                ask(self.port, "ready.probe.test", "A", 0.2)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq did not answer") from None
                time.sleep(0.05)

    def apply(self) -> None:
        """Serve the current ``srv``/``hosts``: SIGHUP if only hosts changed, else restart."""
        text = self._write()
        if text == self._conf_text and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            return
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def dnsmasq(tmp_path) -> Iterator[Dnsmasq]:
    if not os.path.exists(DNSMASQ):
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    d = Dnsmasq(tmp_path, free_port())
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def silent_dns() -> Iterator[str]:
    """The address of a UDP socket that receives queries and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LOCALHOST, 0))
    try:
        yield f"{LOCALHOST}:{s.getsockname()[1]}"
    finally:
        s.close()


class DelayingRelay(asyncio.DatagramProtocol):
    """Forwards each UDP query to ``upstream`` and its answer back after ``delay`` seconds."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.queries = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        self.queries += 1
        t = asyncio.get_running_loop().create_task(self._relay(data, addr, self.delay))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _relay(self, data: bytes, addr, delay: float) -> None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            await loop.sock_connect(s, (LOCALHOST, self.upstream))
            await loop.sock_sendall(s, data)
            try:
                async with asyncio.timeout(2.0):
                    answer = await loop.sock_recv(s, 65535)
            except TimeoutError:
                return
        await asyncio.sleep(delay)  # the slow server under test, not synchronisation
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(answer, addr)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
async def delaying_relay(dnsmasq):
    loop = asyncio.get_running_loop()
    relay = DelayingRelay(dnsmasq.port)
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=(LOCALHOST, 0))
    relay.port = transport.get_extra_info("sockname")[1]
    try:
        yield relay
    finally:
        relay.close()
        await asyncio.gather(*relay.tasks, return_exceptions=True)


class Watching:
    """A source's ``watch`` running in a task; ``applied`` receives each applied set."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self.applied: asyncio.Queue[tuple[Backend, ...]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def on_change(self, backends: tuple[Backend, ...]) -> None:
        await self.applied.put(backends)

    async def __aenter__(self) -> Watching:
        self.task = asyncio.get_running_loop().create_task(self.src.watch(self.on_change))
        return self

    async def __aexit__(self, *exc) -> None:
        self.src.stop()
        assert self.task is not None
        async with asyncio.timeout(5):
            await self.task

    async def next(self, deadline: float = CHANGE_DEADLINE) -> tuple[str, ...]:
        async with asyncio.timeout(deadline):
            got = await self.applied.get()
        return tuple(b.id for b in got)

    async def rounds(self, n: int) -> None:
        """Until the source has made ``n`` more rounds."""
        goal = self.src.stats.rounds + n
        async with asyncio.timeout(CHANGE_DEADLINE):
            while self.src.stats.rounds < goal:
                await asyncio.sleep(0.02)
