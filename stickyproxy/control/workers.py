"""``--workers N``: a supervisor and N worker processes sharing the port (SO_REUSEPORT).

The supervisor owns everything that must be decided once: it validates configurations,
runs the active health checks, serves the admin API and /metrics, and tells every worker
(newline-delimited JSON over a socketpair) about reloads, drains and health changes, so
all workers route every user the same way. Each worker runs a data plane with passive
health of its own and answers ``snapshot`` requests with its counters and its hot-key
counts, which the supervisor sums for /metrics and merges for /hotkeys. A health change
carries the backend's failback wait and ramp as wall-clock instants (``Health.ramp_state``;
the processes share the host's clock, and a message that waited in the socket still means
the same instants), so every worker returns the same users at the same instant; a reload
and a restarted worker get the ramps in force the same way. A worker that dies is restarted; if the supervisor dies,
its workers see the control channel close and shut down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Final

from ..config import Config, ConfigError, FileCopies, load_pinned, loads
from ..routing.hotkeys import HotKeys
from ..routing.table import TableDiff
from . import views
from .logs import setup_logging
from .membership import Membership
from .metrics import RequestShare
from .process import build_process
from .reload import Pinned, Reloader, from_message, watch_mode
from .signals import SignalLatch

log = logging.getLogger("stickyproxy.control.workers")

# How long the supervisor waits for a worker's metrics snapshot before leaving it out.
SNAPSHOT_TIMEOUT = 1.0
# How long a worker has to apply a reload and say so; one that has not by then is
# restarted (with the new configuration) rather than left routing by the old one.
RELOAD_ACK_TIMEOUT = 5.0
# A worker that exits is restarted after this delay (doubling up to the cap while it
# keeps failing), so a crash loop does not spin.
RESTART_DELAY, RESTART_DELAY_MAX = 0.5, 30.0
# Extra time after the shutdown grace before a worker is killed.
KILL_MARGIN = 5.0
# Longest control message (a whole configuration file travels in one).
MAX_CONTROL_LINE = 16 * 1024 * 1024


class WorkerHandle:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.failures = 0
        self.ready = False  # the worker said it is listening
        self.reader_task: asyncio.Task | None = None

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\n")


class Supervisor:
    def __init__(self, config: Config, path: str | None, workers: int, watch: bool = False):
        self.path = path
        self.watch_config = watch
        # the text and key files the running configuration was built from (and the
        # discovered backends), sent to every worker so that all of them apply the same
        pinned = Pinned("", config, {})
        if path:
            pinned = Pinned(*load_pinned(path))
            config = pinned.config
        self.n = workers
        self.process = build_process(config, "supervisor")
        self.table = self.process.table
        self.health = self.process.health
        self.control = self.process.control
        self.control.on_backend_changed = self._broadcast_health

        def health_check(st, ok: bool) -> None:
            if ok and st.healthy:
                # passive ejections are per worker: a passing check lifts them everywhere
                self.broadcast({"op": "check_passed", "id": st.id})

        self.control.on_health_check = health_check
        self.handles = [WorkerHandle(i) for i in range(workers)]
        self.stopping = False
        self.admin: Any = None
        self.seq = 0
        # each backend's share of the requests the workers answered between two scrapes
        self.request_share = RequestShare()
        self.reloader = Reloader(path, self.control, self._apply_everywhere, pinned)
        self.membership = Membership(self.reloader) if config.discovery is not None else None
        if self.membership is not None:
            self.control.discovery = self.membership.stats

    @property
    def config(self) -> Config:
        return self.table.config

    # -- workers -------------------------------------------------------------------------
    async def spawn(self, h: WorkerHandle) -> None:
        parent, child = socket.socketpair()
        cmd = [
            sys.executable,
            "-m",
            "stickyproxy.control.workers",
            "--index",
            str(h.index),
            "--of",
            str(self.n),
            "--control-fd",
            str(child.fileno()),
        ]
        h.ready = False
        h.proc = subprocess.Popen(cmd, pass_fds=[child.fileno()])
        child.close()
        h.reader, h.writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_CONTROL_LINE)
        assert self.reloader.current is not None
        h.send({"op": "config", **self.reloader.current.message()})
        for st in self.table.states.values():
            if not st.healthy:
                h.send({"op": "health", "id": st.id, "up": False, "reason": st.reason})
            if st.drained:
                h.send({"op": "drain", "id": st.id, "on": True})
        h.send({"op": "ramps", "ramps": self._ramps()})
        h.send({"op": "start"})
        h.reader_task = asyncio.get_running_loop().create_task(self._read(h))

    async def _read(self, h: WorkerHandle) -> None:
        assert h.reader is not None
        try:
            while True:
                line = await h.reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if msg.get("op") == "ready":
                    h.ready = True
                    continue
                fut = h.pending.pop(msg.get("seq", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectionError, ValueError):
            pass

    async def watch(self) -> None:
        """Restart workers that exit while the supervisor is running."""
        while not self.stopping:
            await asyncio.sleep(0.2)
            for h in self.handles:
                if h.proc is not None and h.proc.poll() is not None and not self.stopping:
                    code = h.proc.returncode
                    h.failures += 1
                    delay = min(RESTART_DELAY * 2 ** (h.failures - 1), RESTART_DELAY_MAX)
                    log.error("worker %d exited with %s; restarting in %.1fs", h.index, code, delay)
                    h.proc = None
                    if h.writer is not None:
                        h.writer.close()
                    await asyncio.sleep(delay)
                    if not self.stopping:
                        await self.spawn(h)

    def broadcast(self, msg: dict[str, Any]) -> None:
        for h in self.handles:
            h.send(msg)

    def _broadcast_health(self, st) -> None:
        self.broadcast(
            {
                "op": "health",
                "id": st.id,
                "up": st.healthy,
                "reason": st.reason,
                "ramp": self.health.ramp_state(st, time.monotonic()),
            }
        )

    def _ramps(self) -> dict[str, Any]:
        """Every backend's failback wait and ramp now in force, relative to now."""
        now = time.monotonic()
        out = {}
        for bid, st in self.table.states.items():
            state = self.health.ramp_state(st, now)
            if state is not None:
                out[bid] = state
        return out

    async def _ask(
        self, h: WorkerHandle, msg: dict[str, Any], timeout: float = SNAPSHOT_TIMEOUT
    ) -> dict[str, Any] | None:
        self.seq += 1
        seq = self.seq
        msg = dict(msg, seq=seq)
        fut = asyncio.get_running_loop().create_future()
        h.pending[seq] = fut
        h.send(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            h.pending.pop(seq, None)
            return None

    async def snapshots(self, hotkeys: bool = False) -> list[dict[str, Any]]:
        """Every worker's counters (and hot-key counts when asked: merging its two windows
        and encoding them costs a worker about half a millisecond, measured with 1,800 keys,
        which a /metrics scrape need not pay)."""
        msg = {"op": "snapshot", "hotkeys": hotkeys}
        replies = await asyncio.gather(*(self._ask(h, msg) for h in self.handles))
        return [r for r in replies if r is not None]

    # -- the admin API's control interface ------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if not any(h.ready and h.proc is not None and h.proc.poll() is None for h in self.handles):
            return False, "no worker listening yet"
        if not self.table.any_usable(time.monotonic()):
            return False, "no backend is usable"
        return True, ""

    async def metrics_registry(self):
        from .metrics import merge, registry_for

        snaps = await self.snapshots()
        own = self.control.current()
        total = merge([s["stats"] for s in snaps])
        merge([own.snapshot()], into=total)
        # health-derived gauges are the supervisor's: it makes those decisions
        for name in (
            "backend_up",
            "backend_key_share",
            "backend_ramp_progress",
            "ring_info",
            "ring_members",
            "discovery_refusing",
        ):
            total.gauges[name] = dict(own.gauges[name])
        total.gauges["backend_request_share"] = self.request_share.update(
            total.counters["requests"]
        )
        return registry_for(lambda: total)

    async def merged_hotkeys(self) -> tuple[HotKeys | None, int]:
        """Every worker's hot-key counts merged (a worker that does not answer in time or
        sends an unreadable sketch is left out), and how many were merged."""
        hot = self.table.hotkeys
        if hot is None:
            return None, 0
        out = HotKeys(hot.current.max_keys, hot.sample_every, hot.raw)
        merged = 0
        for i, snap in enumerate(await self.snapshots(hotkeys=True)):
            data = snap.get("hotkeys")
            if data is None:
                continue
            try:
                out.merge(HotKeys.from_data(data, f"worker reply {i}.hotkeys"))
            except ValueError as e:
                log.error("hot keys of a worker left out: %s", e)
                continue
            merged += 1
        return out, merged

    async def backends_view(self) -> list[dict]:
        snaps = await self.snapshots()
        inflight: dict[str, int] = {}
        tunnels: dict[str, int] = {}
        for s in snaps:
            for k, v in s.get("inflight", {}).items():
                inflight[k] = inflight.get(k, 0) + v
            for k, v in s.get("tunnels", {}).items():
                tunnels[k] = tunnels.get(k, 0) + v
        return views.backends_view(self.table.router, time.monotonic(), inflight, tunnels)

    def ring_view(self) -> dict:
        return views.ring_view(self.table.router)

    def route_view(self, key: str) -> dict:
        return views.route_view(self.table.router, key, time.monotonic())

    async def drain(self, bid: str, on: bool) -> bool:
        if not self.health.drain(bid, on):
            return False
        self.broadcast({"op": "drain", "id": bid, "on": on})
        return True

    async def reload(self, source: str = "signal") -> tuple[bool, list[str]]:
        return await self.reloader.reload(source)

    async def _apply_everywhere(self, pinned: Pinned, source: str) -> tuple[TableDiff, list[str]]:
        """Apply here, then have every worker apply the same text and key files and
        acknowledge. A worker that refuses or does not answer in time is restarted with
        the new configuration and named in the problems, so no worker keeps routing by the
        old one unseen."""
        diff = self.process.apply(pinned.config)
        live = [h for h in self.handles if h.proc is not None and h.proc.poll() is None]
        # a backend the reload added starts its ramp here; workers take this one
        msg = {"op": "reload", **pinned.message(), "ramps": self._ramps()}
        acks = await asyncio.gather(*(self._ask(h, msg, RELOAD_ACK_TIMEOUT) for h in live))
        problems = []
        for h, ack in zip(live, acks):
            if ack is not None and ack.get("ok"):
                continue
            why = "no answer in time" if ack is None else ack.get("error", "refused")
            problems.append(
                f"worker {h.index}: could not apply it ({why}); "
                f"restarted with the new configuration"
            )
            self.control.worker_reload_failed(h.index)
            if h.proc is not None and h.proc.poll() is None:
                h.proc.terminate()  # it drains; watch() starts it again with the new one
        log.info(
            "reload (%s) applied by %d of %d workers", source, len(live) - len(problems), self.n
        )
        return diff, problems

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Handlers first: a SIGTERM while workers spawn must stop them, not orphan them.
        stop = asyncio.Event()
        hup = SignalLatch(lambda: loop.create_task(self.reload("SIGHUP")))
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup)
        for h in self.handles:
            await self.spawn(h)
        self.health.start()
        if self.membership is not None:
            self.membership.start()
        mode = watch_mode(self.config, self.watch_config) if self.path else None
        files = (
            loop.create_task(self.reloader.watch_files(everything=mode))
            if mode is not None
            else None
        )
        if self.config.admin.enabled:
            from .admin import Admin

            self.admin = Admin(self)
            try:
                await self.admin.start()
            except OSError as e:
                log.error("cannot listen for the admin API: %s", e)
                await self.shutdown()
                return 1
        hup.arm()
        watcher = loop.create_task(self.watch())
        log.info(
            "supervisor running %d workers on %s:%d",
            self.n,
            self.config.listen.host,
            self.config.listen.port,
        )
        await stop.wait()
        watcher.cancel()
        if files is not None:
            files.cancel()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        self.stopping = True
        if self.admin is not None:
            await self.admin.stop()
        if self.membership is not None:
            await self.membership.stop()
        await self.health.stop()
        for h in self.handles:
            if h.proc is not None and h.proc.poll() is None:
                h.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.timeouts.shutdown + KILL_MARGIN
        for h in self.handles:
            while h.proc is not None and h.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if h.proc is not None and h.proc.poll() is None:
                log.error("worker %d did not stop in time: killing it", h.index)
                h.proc.kill()
                h.proc.wait()
            if h.writer is not None:
                h.writer.close()


def supervise(config: Config, path: str | None, workers: int, watch: bool = False) -> int:
    from .server import install_uvloop

    install_uvloop()
    try:
        supervisor = Supervisor(config, path, workers, watch)
    except ConfigError as e:
        # the file changed between the command's check and the supervisor's own read
        print(e.render(), file=sys.stderr)
        return 2
    try:
        return asyncio.run(supervisor.run())
    except KeyboardInterrupt:
        return 0


def _read_sent(text: str, path: str | None, files: dict[str, str]) -> Config:
    """A worker's configuration: the supervisor's text and key-file copies, never disk."""
    return loads(text, path, read_file=FileCopies(files).read)


# -- worker side ---------------------------------------------------------------------------


def follow_ramps(svc: Any, ramps: dict[str, Any]) -> None:
    """Take the supervisor's failback waits and ramps (backends not named have none)."""
    for bid, st in svc.table.states.items():
        data = ramps.get(bid)
        if data is not None or st.ramp is not None or st.failback_until:
            svc.health.follow_ramp(st, data)


# Messages that set routing state, which a starting worker applies before it listens.
STATE_OPS: Final = frozenset({"health", "drain", "ramps", "check_passed"})


async def handle(svc: Any, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
    """Apply one message of the supervisor's."""
    op = msg.get("op")
    if op == "reload":
        reply: dict[str, Any] = {"seq": msg.get("seq"), "ok": True}
        try:
            new = from_message(msg, _read_sent)
            await svc.apply(new, FileCopies(msg.get("files") or {}).read)
            follow_ramps(svc, msg.get("ramps") or {})
        except (ConfigError, OSError) as e:
            log.error("worker %d: reload failed: %s", svc.worker, e)
            reply = {"seq": msg.get("seq"), "ok": False, "error": str(e)}
        writer.write(json.dumps(reply).encode() + b"\n")
    elif op == "drain":
        svc.health.drain(msg["id"], bool(msg["on"]))
    elif op == "health":
        st = svc.table.states.get(msg["id"])
        if st is not None:
            svc.health.set_health(st, bool(msg["up"]), msg.get("reason", ""))
            if msg.get("up"):
                svc.health.follow_ramp(st, msg.get("ramp"))
    elif op == "ramps":
        follow_ramps(svc, msg.get("ramps") or {})
    elif op == "check_passed":
        st = svc.table.states.get(msg["id"])
        if st is not None:
            svc.health.check_passed(st)
    elif op == "snapshot":
        inflight = svc.proxy.inflight()
        hot = svc.table.hotkeys
        reply = {
            "seq": msg.get("seq"),
            "stats": svc.observer.snapshot(inflight, extra=svc.proxy.tls_counts),
            "inflight": inflight,
            "tunnels": svc.proxy.tunnels(),
            "hotkeys": (
                hot.view(time.monotonic()).to_data()
                if hot is not None and msg.get("hotkeys")
                else None
            ),
        }
        writer.write(json.dumps(reply).encode() + b"\n")


async def follow_control(
    svc: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    """Apply the supervisor's messages; stop when the channel closes."""
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            await handle(svc, json.loads(line), writer)
    except (ConnectionError, ValueError) as e:
        log.error("worker %d: control channel failed: %s", svc.worker, e)
    if not stop.is_set():
        log.warning("worker %d: supervisor went away; stopping", svc.worker)
        stop.set()


async def _worker_main(index: int, of: int, fd: int) -> int:
    from .server import Service

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_CONTROL_LINE)
    first = json.loads(await reader.readline() or b"{}")
    if first.get("op") != "config":
        return 1
    try:
        config = from_message(first, _read_sent)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return 2
    setup_logging(config.logging)
    svc = Service(
        config,
        first.get("path"),
        worker=index,
        workers=of,
        admin=False,
        read_file=FileCopies(first.get("files") or {}).read,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reloads come from the supervisor
    # The routing state the supervisor holds (backends down, drained, ramping) comes right
    # after the configuration and ends with "start": applied before listening, so a
    # restarted worker never routes a request by its defaults. Anything else that arrives
    # meanwhile is applied once listening.
    later: list[dict[str, Any]] = []
    while True:
        line = await reader.readline()
        if not line:
            return 0
        msg = json.loads(line)
        if msg.get("op") == "start":
            break
        if msg.get("op") in STATE_OPS:
            await handle(svc, msg, writer)
        else:
            later.append(msg)
    await svc.start(reuse_port=True)
    for msg in later:
        await handle(svc, msg, writer)
    writer.write(json.dumps({"op": "ready"}).encode() + b"\n")
    ctl = loop.create_task(follow_control(svc, reader, writer, stop))
    await stop.wait()
    ctl.cancel()
    await svc.stop()
    return 0


def worker_entry(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stickyproxy-worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--of", type=int, required=True)
    p.add_argument("--control-fd", type=int, required=True)
    a = p.parse_args(argv)
    from .server import install_uvloop

    install_uvloop()
    return asyncio.run(_worker_main(a.index, a.of, a.control_fd))


if __name__ == "__main__":
    sys.exit(worker_entry())
