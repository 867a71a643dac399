"""``stickyproxy demo`` as a user runs it: a subprocess on a free port, started from a
directory outside the checkout. It serves sticky traffic through the proxy, keeps every
user's cart when an instance is killed, obeys commands from a terminal, draws a live view
that fits 80x24, stops everything it started within a bounded time, and leaves nothing
behind when it is itself killed."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from support.net import IO_TIMEOUT, free_port
from support.procs import alive, descendants

# Start-up: Redis, three Python app processes and the proxy, on a loaded CI machine.
START_DEADLINE = 60.0
# From SIGINT, q or --duration expiry to the demo's exit (its own bound is about 10 s).
STOP_DEADLINE = 20.0
# Users the tests create besides the demo's simulated ones.
TEST_USERS = 30
# --duration of the terminal test: long enough to stop, restart and see app-2 healthy again.
DURATION = 10
BANNER_LINE = re.compile(r"^\s+(redis|app-\d)\s+(\S+)\s+pid (\d+)$")
SUMMARY = re.compile(r"^demo summary: answers=(\d+) failed=(\d+) rate_limited=(\d+) lost=(\d+)$")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class DemoProcess:
    """The demo as a subprocess in its own session; its stdout collected line by line."""

    def __init__(
        self, port: int, *extra: str, cwd: Path, stdin=subprocess.DEVNULL, env=None
    ) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stickyproxy.cli",
                "demo",
                "--no-ui",
                "--port",
                str(port),
                *extra,
            ],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for raw in stream:
            into.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def join_output(self) -> None:
        """After exit: until every line the demo wrote has been read."""
        for t in self._threads:
            t.join(IO_TIMEOUT)

    def output(self) -> str:
        return "\n".join(self.lines + ["--- stderr ---"] + self.errors)

    def wait_line(self, pattern: str, deadline: float, start: int = 0) -> re.Match:
        rx = re.compile(pattern)
        end = time.monotonic() + deadline
        while True:
            exited = self.proc.poll() is not None
            if exited:
                self.join_output()
            for line in self.lines[start:]:
                m = rx.search(line)
                if m:
                    return m
            assert not exited, (
                f"demo exited ({self.proc.returncode}) before {pattern!r}:\n{self.output()}"
            )
            assert time.monotonic() < end, f"no {pattern!r} within {deadline}s:\n{self.output()}"
            time.sleep(0.05)

    def started(self) -> dict[str, tuple[str, int]]:
        """name -> (url, pid) from the banner, once the first status line is out."""
        self.wait_line(r"^\[\s*\d+s\] ", START_DEADLINE)
        found = {}
        for line in self.lines:
            m = BANNER_LINE.match(line)
            if m:
                found[m.group(1)] = (m.group(2), int(m.group(3)))
        assert set(found) == {"redis", "app-1", "app-2", "app-3"}, self.output()
        return found

    def descendants(self) -> set[int]:
        return descendants(self.proc.pid)

    def wait_exit(self, deadline: float) -> int:
        try:
            return self.proc.wait(deadline)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"demo still running {deadline}s after being told to stop:\n{self.output()}"
            ) from None

    def kill_all(self) -> None:
        for pid in self.descendants() | {self.proc.pid}:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)


@pytest.fixture
def demo(tmp_path):
    """Demos started from an empty directory outside the checkout (nothing there to find)."""
    started: list[DemoProcess] = []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def make(*extra: str, port: int | None = None, **kwargs) -> DemoProcess:
        d = DemoProcess(port or free_port(), *extra, cwd=elsewhere, **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc.poll() is None:
            d.kill_all()


async def until_ok(
    session, method: str, url: str, user: str, deadline: float = IO_TIMEOUT, ok: int = 200, **kw
):
    """The first ``ok`` answer to a request repeated until ``deadline`` (bounded attempts)."""
    end = time.monotonic() + deadline
    while True:
        try:
            async with session.request(method, url, headers={"X-User-Id": user}, **kw) as r:
                if r.status == ok:
                    return r.headers["X-Served-By"], await r.json()
                last = f"{r.status} {await r.text()}"
        except aiohttp.ClientError as e:
            last = repr(e)
        assert time.monotonic() < end, f"{method} {url} for {user}: {last}"
        await asyncio.sleep(0.05)


def test_demo_refuses_a_port_in_use(demo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = demo(port=port)
        assert d.wait_exit(STOP_DEADLINE) == 2
    d.join_output()
    assert f"cannot listen on 127.0.0.1:{port}: already in use" in d.output()
    assert "choose another port with --port N" in d.output()


def test_demo_without_redis_says_how_to_install(demo, tmp_path):
    d = demo(env={**os.environ, "PATH": str(tmp_path)})
    assert d.wait_exit(STOP_DEADLINE) == 2
    d.join_output()
    assert "apt-get install redis-server" in d.output()


@pytest.mark.slow
async def test_sticky_traffic_survives_a_killed_instance_and_everything_stops(demo):
    d = demo("--duration", "120")
    procs = d.started()
    proxy = f"http://127.0.0.1:{d.port}"
    users = [f"t-{i}" for i in range(TEST_USERS)]
    carts: dict[str, dict[str, int]] = {}
    home: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT)) as s:
        for i, u in enumerate(users):
            served, body = await until_ok(
                s, "POST", proxy + "/cart/items", u, json={"item": "apple", "qty": 1 + i % 5}
            )
            carts[u] = {"apple": body["qty"]}
            home[u] = served
            for _ in range(3):
                served_again, _ = await until_ok(s, "POST", proxy + "/counter", u)
                assert served_again == served
        for u in users:
            served, body = await until_ok(s, "GET", proxy + "/cart", u)
            assert served == home[u] and body["items"] == carts[u]
        assert len(set(home.values())) > 1

        _, job = await until_ok(s, "POST", proxy + "/jobs", "t-0", ok=202)
        async with s.ws_connect(proxy + job["ws"], headers={"X-User-Id": "t-0"}) as ws:
            steps = []
            async with asyncio.timeout(IO_TIMEOUT):
                while len(steps) < 3:
                    steps.append((await ws.receive_json())["step"])
        assert steps == sorted(set(steps))
        await until_ok(s, "GET", proxy + f"/jobs/{job['id']}", "t-0")

        victim = max(set(home.values()), key=lambda b: list(home.values()).count(b))
        everyone = d.descendants() | {pid for _, pid in procs.values()}
        os.kill(procs[victim][1], signal.SIGKILL)
        d.wait_line(rf"{victim} exited \(pid {procs[victim][1]}, signal SIGKILL\)", IO_TIMEOUT * 2)

        for u in users:
            served, body = await until_ok(s, "GET", proxy + "/cart", u)
            assert body["items"] == carts[u], u
            if home[u] == victim:
                assert served != victim
            else:
                assert served == home[u], f"{u} moved although its instance is up"
            _, counter = await until_ok(s, "POST", proxy + "/counter", u)
            assert counter["value"] == 4, u
        mark = len(d.lines)
        d.wait_line(rf"{victim} exited \(down\)", IO_TIMEOUT, start=mark)

    d.proc.send_signal(signal.SIGINT)
    assert d.wait_exit(STOP_DEADLINE) == 0
    d.join_output()
    assert "stopped: everything the demo started has exited" in d.lines
    assert re.search(
        r"stopping after \d+s: \d+ answers, \d+ failed, 0 rate-limited, 0 lost updates", d.output()
    )
    summary = SUMMARY.match(d.lines[-1])
    assert summary is not None, d.output()
    assert int(summary.group(1)) > 0 and summary.group(3) == summary.group(4) == "0"
    assert [p for p in everyone if alive(p)] == []
    workdir = d.wait_line(r"^\s+logs\s+(\S+)$", 0).group(1)
    assert not Path(workdir).exists()


@pytest.mark.slow
def test_terminal_commands_stop_and_start_an_instance_then_duration_ends_it(demo):
    master, slave = pty.openpty()
    try:
        d = demo("--duration", str(DURATION), stdin=slave)
        procs = d.started()
        assert "commands: 1, 2, 3 stop or start an instance; q quits" in d.lines
        os.write(master, b"2\n")
        d.wait_line(rf"app-2 killed \(pid {procs['app-2'][1]}\)", IO_TIMEOUT)
        d.wait_line(r"app-2 killed \(", IO_TIMEOUT, start=len(d.lines))
        assert not alive(procs["app-2"][1])
        os.write(master, b"2\n")
        restarted = int(d.wait_line(r"app-2 started \(pid (\d+)\)", IO_TIMEOUT).group(1))
        d.wait_line(r"app-2 up, ", IO_TIMEOUT * 2, start=len(d.lines))
        everyone = d.descendants() | {pid for _, pid in procs.values()} | {restarted}
        assert d.wait_exit(DURATION + STOP_DEADLINE) == 0
    finally:
        os.close(master)
        os.close(slave)
    assert [p for p in everyone if alive(p)] == []


def wait_gone(pids: set[int], deadline: float) -> list[int]:
    end = time.monotonic() + deadline
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_killed_demo_leaves_no_process_and_no_directory_behind(demo, sig):
    """The demo dies without cleaning up (SIGKILL; SIGSEGV as a crash in compiled code):
    Redis, the shops and the watchdog are gone soon after, and so is the temporary
    directory."""
    d = demo("--duration", "120")
    procs = d.started()
    workdir = Path(d.wait_line(r"^\s+logs\s+(\S+)$", 0).group(1))
    assert workdir.is_dir()
    everyone = d.descendants() | {pid for _, pid in procs.values()}
    assert len(everyone) >= 5, everyone  # redis, three shops, the watchdog
    os.kill(d.proc.pid, sig)
    assert d.proc.wait(STOP_DEADLINE) == -sig
    assert wait_gone(everyone, STOP_DEADLINE) == []
    end = time.monotonic() + STOP_DEADLINE
    while workdir.exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert not workdir.exists()


def frames(screen: str) -> list[list[str]]:
    """Each complete live-view frame (cursor home ... clear below) as its visible lines."""
    out = []
    for chunk in screen.split("\x1b[H")[1:]:
        if "\x1b[J" not in chunk:
            continue
        body = chunk.split("\x1b[J", 1)[0].replace("\r", "")
        out.append([ESCAPE.sub("", line) for line in body.split("\n")[:-1]])
    return out


@pytest.mark.slow
def test_the_live_view_fits_an_80x24_terminal():
    """In an 80x24 pty: every frame is at most 23 lines (the last row is never written, so
    nothing scrolls) of at most 80 columns, and its first line is the title with the keys."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stickyproxy.cli",
            "demo",
            "--port",
            str(free_port()),
            "--duration",
            "60",
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    received = bytearray()
    try:
        end = time.monotonic() + START_DEADLINE
        while len(frames(received.decode("utf-8", "replace"))) < 3:
            assert proc.poll() is None, received.decode("utf-8", "replace")
            assert time.monotonic() < end, received.decode("utf-8", "replace")
            readable, _, _ = select.select([master], [], [], 0.5)
            if readable:
                try:
                    received += os.read(master, 65536)
                except OSError:
                    break
        os.write(master, b"q")
        assert proc.wait(STOP_DEADLINE) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(master)
    shown = frames(received.decode("utf-8", "replace"))
    assert len(shown) >= 3
    for frame in shown:
        assert len(frame) <= 23, frame
        assert all(len(line) <= 80 for line in frame), frame
        assert frame[0].startswith("stickyproxy demo") and "q quit" in frame[0], frame
        assert any(line.startswith(" [3]  app-3") for line in frame), frame
