"""``stickyproxy demo``: Redis, three instances of the example shop and the proxy in front of
them, on this machine, with a live view, light background traffic from simulated users, and
commands to stop and start instances so a failover can be watched.

Everything listens on 127.0.0.1. Each child process runs in its own process group; however
the demo ends (q, Ctrl-C, SIGTERM, ``--duration``) every one of them is stopped: SIGTERM,
then SIGKILL after a grace period. A demo that crashes or is killed leaves nothing behind
either (``procs.py``: a parent-death signal per child, and a watchdog).

The last line of a run that served is machine-checkable: ``SUMMARY_FORMAT``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from ..config import load
from .commands import CommandInput
from .procs import (
    Child,
    DemoError,
    free_port,
    port_in_use,
    python_env,
    redis_server_binary,
    shop_argv,
    wait_http_ok,
    wait_redis,
)
from .traffic import Traffic, TrafficStats
from .view import (
    ENTER_SCREEN,
    EVENT_LINES,
    LEAVE_SCREEN,
    MIN_HEIGHT,
    MIN_WIDTH,
    Poller,
    Row,
    Snapshot,
    screen,
    status_line,
)

if TYPE_CHECKING:
    from ..control.server import Service

log = logging.getLogger("stickyproxy.demo")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
HOST = "127.0.0.1"
INSTANCES = 3
REDIS_START_DEADLINE = 10.0
# Three Python processes importing aiohttp and redis at once on a slow machine.
APP_START_DEADLINE = 30.0
REFRESH = 1.0
# SIGTERM → SIGKILL for each child; the shop finishes in-flight requests within 2 s.
CHILD_GRACE = 3.0
PROXY_STOP_DEADLINE = 5.0
INSTALL_REDIS = (
    "stickyproxy demo needs redis-server on the PATH. Install it with\n"
    "  apt-get install redis-server   (Debian, Ubuntu)\n"
    "  dnf install redis              (Fedora)\n"
    "  brew install redis             (macOS)\n"
    "and run the demo again."
)
# How long a clean end waits for the watchdog to take its goodbye and exit.
WATCHDOG_EXIT_DEADLINE = 2.0
# The run's last line: key=value pairs, so a script can check it (.ci/package.sh does).
SUMMARY_FORMAT = "demo summary: answers={ok} failed={failed} rate_limited={limited} lost={lost}"

PROXY_TOML = """\
# The demo's proxy: users keyed by the X-User-Id header, a uid cookie or ?user=.
[listen]
host = "{host}"
port = {port}

[admin]
host = "{host}"
port = 0

[routing]
keys = [
  {{ from = "header", name = "X-User-Id" }},
  {{ from = "cookie", name = "uid" }},
  {{ from = "query",  name = "user" }},
]
no_key = "round-robin"

[health]
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2

[timeouts]
response = "10s"
shutdown = "2s"
drain = "2s"
{backends}"""

BACKEND_TOML = """
[[backends]]
id = "{id}"
url = "{url}"
"""


@dataclass
class App:
    key: str
    id: str
    port: int
    child: Child

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def process_state(self) -> str:
        if self.child.running:
            return "running"
        return "killed" if self.child.stopped_on_purpose else "exited"


class Interrupted(Exception):
    """Asked to stop before everything had started."""


class Demo:
    def __init__(self, port: int, duration: float, ui: bool, redis_bin: str) -> None:
        self.port = port
        self.duration = duration
        self.ui = ui
        self.redis_bin = redis_bin
        self.stopping = asyncio.Event()
        self.workdir = Path(tempfile.mkdtemp(prefix="stickyproxy-demo-"))
        self.env = python_env()
        self.watchdog = self._start_watchdog()
        self.redis: Child | None = None
        self.redis_url = ""
        self.apps: list[App] = []
        self.svc: Service | None = None
        self.admin_url = ""
        self.events: deque[str] = deque(maxlen=EVENT_LINES)
        self.keep_logs = False
        self.log_handler: logging.Handler | None = None
        self.summary: TrafficStats | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- the whole run ---------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stopping.set)
        self._log_to_file()
        try:
            async with aiohttp.ClientSession() as session:
                try:
                    await self._until_stopped(self._start(session))
                except DemoError as e:
                    print(f"stickyproxy demo: {e}", file=sys.stderr)
                    self.keep_logs = True
                    return EXIT_FAIL
                except Interrupted:
                    return EXIT_OK
                await self._serve(session)
            return EXIT_OK
        finally:
            left = await self._stop_all()
            self._close_log()
            if not self.keep_logs:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if left:
                # not dismissed: the watchdog kills their groups once this process exits
                print(
                    "stickyproxy demo: still running after SIGKILL, left to the watchdog: "
                    + ", ".join(f"{c.name} (pid {c.pid})" for c in left),
                    file=sys.stderr,
                )
            else:
                await self._dismiss_watchdog()
                print("stopped: everything the demo started has exited", flush=True)
            if self.keep_logs:
                print(f"stickyproxy demo: logs kept in {self.workdir}", file=sys.stderr)
            if self.summary is not None:
                s = self.summary
                print(
                    SUMMARY_FORMAT.format(ok=s.ok, failed=s.failed, limited=s.limited, lost=s.lost),
                    flush=True,
                )

    # -- the watchdog ----------------------------------------------------------------------
    def _start_watchdog(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "stickyproxy.demo.watchdog", str(self.workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )

    def _tell_watchdog(self, line: str) -> None:
        pipe = self.watchdog.stdin
        if pipe is None:
            return
        try:
            pipe.write(line.encode() + b"\n")
            pipe.flush()
        except (BrokenPipeError, ValueError):
            log.warning("demo: the watchdog is gone; a crash would leave processes behind")

    def _watch_group(self, pgid: int) -> None:
        self._tell_watchdog(f"pgid {pgid}")

    async def _dismiss_watchdog(self) -> None:
        """Everything is stopped and cleaned up: the watchdog may leave without acting."""
        self._tell_watchdog("bye")
        if self.watchdog.stdin is not None:
            with suppress(BrokenPipeError):
                self.watchdog.stdin.close()
        try:
            await asyncio.to_thread(self.watchdog.wait, WATCHDOG_EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()

    async def _until_stopped(self, work) -> None:
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError, DemoError):
                await task
            raise Interrupted
        task.result()

    # -- start-up --------------------------------------------------------------------------
    async def _start(self, session: aiohttp.ClientSession) -> None:
        redis_port = free_port()
        self.redis = Child(
            "redis",
            [
                self.redis_bin,
                "--port",
                str(redis_port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            self.workdir / "redis.log",
            cwd=self.workdir,
            on_start=self._watch_group,
        )
        self.redis.start()
        await wait_redis(self.redis, redis_port, REDIS_START_DEADLINE)
        self.redis_url = f"redis://{HOST}:{redis_port}/0"

        for n in range(1, INSTANCES + 1):
            node, port = f"app-{n}", free_port()
            child = Child(
                node,
                shop_argv(port, node, self.redis_url),
                self.workdir / f"{node}.log",
                env=self.env,
                cwd=self.workdir,
                on_start=self._watch_group,
            )
            self.apps.append(App(str(n), node, port, child))
            child.start()
        await asyncio.gather(
            *(
                wait_http_ok(a.child, session, a.url + "/healthz", APP_START_DEADLINE)
                for a in self.apps
            )
        )

        from ..control.server import Service

        path = self.workdir / "stickyproxy.toml"
        path.write_text(
            PROXY_TOML.format(
                host=HOST,
                port=self.port,
                backends="".join(BACKEND_TOML.format(id=a.id, url=a.url) for a in self.apps),
            )
        )
        svc = self.svc = Service(load(str(path)), str(path))
        try:
            await svc.start()
        except OSError as e:
            raise DemoError(f"cannot listen on {HOST}:{self.port}: {e.strerror or e}") from None
        self.admin_url = f"http://{HOST}:{svc.admin.port}"

    # -- serving ---------------------------------------------------------------------------
    async def _serve(self, session: aiohttp.ClientSession) -> None:
        started = time.monotonic()
        traffic = Traffic(self.proxy_url)
        commands = CommandInput(self._command, keys=self.ui)
        tasks: list[asyncio.Task[None]] = []
        timer: asyncio.TimerHandle | None = None
        try:
            commands_enabled = commands.start()
            self._print_banner(commands_enabled)
            if self.ui:
                sys.stdout.write(ENTER_SCREEN)
                sys.stdout.flush()
            tasks = [
                asyncio.create_task(traffic.run(), name="demo-traffic"),
                asyncio.create_task(
                    self._refresh(session, traffic, started, commands_enabled), name="demo-view"
                ),
            ]
            if self.duration > 0:
                timer = asyncio.get_running_loop().call_later(self.duration, self.stopping.set)
            await self.stopping.wait()
        finally:
            if timer is not None:
                timer.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(asyncio.CancelledError):
                    try:
                        await task
                    except Exception:
                        log.exception("demo: %s failed", task.get_name())
            commands.stop()
            if self.ui:
                sys.stdout.write(LEAVE_SCREEN)
            s = traffic.stats
            print(
                f"stopping after {time.monotonic() - started:.0f}s: {s.ok} answers, {s.failed} failed, "
                f"{s.limited} rate-limited, {s.lost} lost updates",
                flush=True,
            )
            for detail in traffic.lost_details[:EVENT_LINES]:
                print(f"  lost: {detail}", flush=True)
            self.summary = s

    def _print_banner(self, commands_enabled: bool) -> None:
        assert self.redis is not None
        lines = [
            "stickyproxy demo: Redis, three instances of the example shop, and the proxy in front of them",
            "",
            f"  proxy   {self.proxy_url}  (users keyed by the X-User-Id header, a uid cookie or ?user=)",
            f"  admin   {self.admin_url}  (GET /backends, /ring, /route?key=alice, /metrics)",
            f"  redis   {self.redis_url}  pid {self.redis.pid}",
        ]
        lines += [f"  {a.id}   {a.url}  pid {a.child.pid}" for a in self.apps]
        lines += [
            f"  logs    {self.workdir}",
            "",
            "try:",
            *self._tips(),
            "",
            "Stop the instance that served you (its number, or kill its pid) and ask for the cart",
            "again: another instance answers, with the same cart.",
            (
                "commands: 1, 2, 3 stop or start an instance; q quits"
                if commands_enabled
                else "commands: none (stdin is not a terminal); Ctrl-C or SIGTERM stops the demo"
            ),
            "",
        ]
        print("\n".join(lines), flush=True)

    def _tips(self) -> list[str]:
        return [
            f'  curl -si -X POST -H \'X-User-Id: you\' -d \'{{"item": "apple", "qty": 2}}\' {self.proxy_url}/cart/items',
            f"  curl -si -H 'X-User-Id: you' {self.proxy_url}/cart       # X-Served-By: the instance holding you",
            f"  curl -s '{self.admin_url}/route?key=you'                  # your instance, and where you go if it fails",
        ]

    def _short_tips(self) -> list[str]:
        """The tips again, short enough for an 80-column live view."""
        proxy = self.proxy_url.removeprefix("http://")
        admin = self.admin_url.removeprefix("http://")
        return [
            f'curl -H \'X-User-Id: you\' -d \'{{"item":"tea","qty":1}}\' {proxy}/cart/items',
            f"curl -si -H 'X-User-Id: you' {proxy}/cart    # X-Served-By",
            f"curl -s '{admin}/route?key=you'",
        ]

    async def _refresh(
        self,
        session: aiohttp.ClientSession,
        traffic: Traffic,
        started: float,
        commands_enabled: bool,
    ) -> None:
        poller = Poller(session, self.admin_url)
        header = [f"proxy {self.proxy_url}  admin {self.admin_url}", f"redis {self.redis_url}"]
        tips = self._short_tips()
        while True:
            tick = time.monotonic()
            self._watch_children()
            rows = [Row(a.key, a.id, a.url, a.child.pid, a.process_state()) for a in self.apps]
            await poller.fill(rows)
            s = traffic.stats
            snap = Snapshot(
                rows,
                time.monotonic() - started,
                s.ok,
                s.failed,
                s.limited,
                s.lost,
                traffic.placement(),
            )
            try:
                if self.ui:
                    size = shutil.get_terminal_size((MIN_WIDTH, MIN_HEIGHT))
                    sys.stdout.write(
                        screen(
                            snap,
                            header,
                            tips,
                            list(self.events),
                            commands_enabled,
                            max(size.columns, 20),
                            max(size.lines, 4),
                        )
                    )
                    sys.stdout.flush()
                else:
                    print(status_line(snap), flush=True)
            except BrokenPipeError:
                self.stopping.set()
                return
            await asyncio.sleep(max(0.0, REFRESH - (time.monotonic() - tick)))

    # -- commands and events ---------------------------------------------------------------
    def _command(self, command: str) -> None:
        if command in ("q", "quit", "exit"):
            self.stopping.set()
            return
        for app in self.apps:
            if command == app.key:
                self._toggle(app)
                return
        self._event(f"unknown command {command!r}: 1, 2, 3 stop or start an instance, q quits")

    def _toggle(self, app: App) -> None:
        if app.child.running:
            pid = app.child.pid
            app.child.kill()
            self._event(f"{app.id} killed (pid {pid}): its users fail over, state from Redis")
        else:
            app.child.start()
            self._event(f"{app.id} started (pid {app.child.pid}): users move back once healthy")

    def _watch_children(self) -> None:
        for app in self.apps:
            c = app.child
            if not c.running and not c.stopped_on_purpose and not c.exit_reported:
                c.exit_reported = True
                self._event(
                    f"{app.id} exited (pid {c.pid}, {c.exit_status()}): "
                    f"press {app.key} to start it again"
                )
        r = self.redis
        if r is not None and not r.running and not r.exit_reported:
            r.exit_reported = True
            self._event(
                f"redis exited ({r.exit_status()}): users held in memory are still "
                "served; changes are refused (503)"
            )

    def _event(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        self.events.append(line)
        if not self.ui:
            print(line, flush=True)

    # -- shutting down ---------------------------------------------------------------------
    async def _stop_all(self) -> list[Child]:
        """Stop the proxy, the apps and Redis; the children still running afterwards."""
        if self.svc is not None:
            try:
                await asyncio.wait_for(self.svc.stop(), PROXY_STOP_DEADLINE)
            except Exception as e:  # noqa: BLE001 - a proxy that fails to stop must not keep the children alive
                log.warning("demo: the proxy did not stop cleanly: %r", e)
        await asyncio.gather(*(a.child.stop(CHILD_GRACE) for a in self.apps))
        if self.redis is not None:
            await self.redis.stop(CHILD_GRACE)
        children = [a.child for a in self.apps] + ([self.redis] if self.redis else [])
        return [c for c in children if c.running]

    def _log_to_file(self) -> None:
        handler = logging.FileHandler(self.workdir / "proxy.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        self.log_handler = handler

    def _close_log(self) -> None:
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        print("stickyproxy demo: --port must be from 1 to 65535", file=sys.stderr)
        return EXIT_USAGE
    if args.duration < 0:
        print("stickyproxy demo: --duration must not be negative", file=sys.stderr)
        return EXIT_USAGE
    redis_bin = redis_server_binary()
    if redis_bin is None:
        print(INSTALL_REDIS, file=sys.stderr)
        return EXIT_USAGE
    problem = port_in_use(HOST, args.port)
    if problem is not None:
        print(
            f"stickyproxy demo: cannot listen on {HOST}:{args.port}: {problem}; "
            "choose another port with --port N",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from ..control.startup import check_runtime

    problems = check_runtime()
    if problems:
        for p in problems:
            print(f"stickyproxy demo: start-up check failed: {p}", file=sys.stderr)
        return EXIT_FAIL
    from ..control.server import install_uvloop

    install_uvloop()
    ui = not args.no_ui and sys.stdout.isatty()
    try:
        return asyncio.run(Demo(args.port, args.duration, ui, redis_bin).run())
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
