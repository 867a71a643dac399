"""Wires the pieces together: the data plane, health, admin API, signals, reload, workers.

``serve`` runs in the foreground until SIGTERM/SIGINT. With ``--workers N`` (N > 1) a
supervisor starts N worker processes that share the listening port through SO_REUSEPORT;
each worker runs its own data plane, health checks and timers, and applies reloads and
drains it is told about.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from typing import Any

from .. import compiled, tls
from ..config import Config, FileCopies, ReadFile, read_disk
from ..routing.table import TableDiff
from . import views
from .logs import setup_logging
from .membership import Membership
from .process import build_process, freeze_heap
from .reload import Pinned, Reloader, ReloadRefused, watch_mode
from .signals import SignalLatch

log = logging.getLogger("stickyproxy")


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class Service:
    """One process that serves traffic: data plane + health + (optionally) the admin
    listener. ``worker``: its index under a supervisor, which then owns active health
    checks, the admin API and reloads (this process applies what it is sent)."""

    def __init__(
        self,
        config: Config,
        path: str | None,
        *,
        worker: int = 0,
        workers: int = 1,
        admin: bool = True,
        watch_config: bool = False,
        read_file: ReadFile = read_disk,
    ):
        self.path = path
        self.worker = worker
        self.workers = workers
        self.process = build_process(
            config, "worker" if workers > 1 else "single", read_file=read_file
        )
        self.table = self.process.table
        self.health = self.process.health
        assert self.process.observer is not None and self.process.proxy is not None
        self.observer = self.process.observer
        self.proxy = self.process.proxy
        self.reloader = Reloader(
            path, self.process.control, self._apply_pinned, Pinned("", config, {})
        )
        # discovery runs where reloads are decided: here, unless a supervisor decides
        self.membership = (
            Membership(self.reloader) if config.discovery is not None and workers <= 1 else None
        )
        if self.membership is not None:
            self.process.control.discovery = self.membership.stats
        self.watch = watch_mode(config, watch_config) if path is not None else None
        self.watcher: asyncio.Task | None = None
        self.watching = asyncio.Event()  # set once the watched files were first looked at
        self.admin_enabled = admin and config.admin.enabled
        self.admin: Any = None
        self.stopped = asyncio.Event()

    @property
    def config(self) -> Config:
        return self.table.config

    async def start(self, *, reuse_port: bool = False, sock: Any = None) -> None:
        await self.proxy.start(reuse_port=reuse_port, sock=sock)
        self.health.start()
        if self.membership is not None:
            self.membership.start()
        if self.watch is not None and self.workers <= 1:
            self.watcher = asyncio.get_running_loop().create_task(
                self.reloader.watch_files(watching=self.watching, everything=self.watch)
            )
        if self.admin_enabled:
            from .admin import Admin

            self.admin = Admin(self)
            await self.admin.start()
        freeze_heap()
        n = len(self.config.backends)
        log.info(
            "listening on %s:%d (worker %d, ring %s, %d backend%s, %s data plane)",
            self.config.listen.host,
            self.proxy.port,
            self.worker,
            self.table.router.fingerprint,
            n,
            "" if n == 1 else "s",
            compiled.build(),
        )

    async def reload(self, source: str = "signal") -> tuple[bool, list[str]]:
        """Load the config file again; apply it only if valid. (ok, errors)"""
        return await self.reloader.reload(source)

    async def _apply_pinned(self, pinned: Pinned, source: str) -> tuple[TableDiff, list[str]]:
        try:
            return await self.apply(
                pinned.config, FileCopies(pinned.files).read if pinned.files else read_disk
            ), []
        except OSError as e:
            raise ReloadRefused(f"listen: cannot listen on the new address: {e}") from e

    async def apply(self, new: Config, read_file: ReadFile = read_disk) -> TableDiff:
        """Swap in a validated configuration; certificates are read with ``read_file``.
        The listener is made anew only when its address changed or TLS was switched on or
        off (or given a new handshake timeout): the new one first, so no moment accepts
        nothing; OSError if it cannot, and then nothing changed. On the same address that
        needs SO_REUSEPORT, which only --workers listeners have: a single process refuses."""
        old = self.config
        moved = (new.listen.host, new.listen.port) != (old.listen.host, old.listen.port)
        if moved or tls.needs_new_listener(old.listen.tls, new.listen.tls):
            if not moved and self.workers <= 1:
                raise OSError(
                    errno.EADDRINUSE,
                    "switching TLS on or off, or changing "
                    "listen.tls.handshake_timeout, on the same address needs a "
                    "restart (or --workers)",
                )
            await self.proxy.rebind(
                new.listen.host,
                new.listen.port,
                reuse_port=self.workers > 1,
                listen_tls=new.listen.tls,
                read_file=read_file,
            )
            log.warning(
                "reload: now listening on %s:%d%s",
                new.listen.host,
                self.proxy.port,
                " (TLS)" if new.listen.tls is not None else "",
            )
        return self.process.apply(new, read_file)

    # -- the admin API's view of this process --------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.proxy.stopping:
            return False, "shutting down"
        if not self.table.any_usable(time.monotonic()):
            return False, "no backend is usable"
        return True, ""

    async def metrics_registry(self):
        from .metrics import registry_for

        return registry_for(
            lambda: self.observer.current(self.proxy.inflight(), extra=self.proxy.tls_counts)
        )

    async def backends_view(self) -> list[dict]:
        return views.backends_view(
            self.table.router, time.monotonic(), self.proxy.inflight(), self.proxy.tunnels()
        )

    def ring_view(self) -> dict:
        return views.ring_view(self.table.router)

    def route_view(self, key: str) -> dict:
        return views.route_view(self.table.router, key, time.monotonic())

    async def drain(self, bid: str, on: bool) -> bool:
        return self.health.drain(bid, on)

    async def stop(self) -> None:
        log.info(
            "stopping: finishing in-flight requests (up to %.1fs)", self.config.timeouts.shutdown
        )
        if self.admin is not None:
            await self.admin.stop()
        if self.watcher is not None:
            self.watcher.cancel()
        if self.membership is not None:
            await self.membership.stop()
        await self.health.stop()
        cut = await self.proxy.stop()
        if cut:
            log.warning(
                "stopped: %d connection%s still busy at the deadline were closed",
                cut,
                "" if cut == 1 else "s",
            )
        else:
            log.info("stopped: every in-flight request finished")
        self.stopped.set()


async def _run_service(config: Config, path: str | None, watch: bool = False) -> int:
    svc = Service(config, path, watch_config=watch)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers go in before the port opens: a supervisor (or test) that sees the port
    # listening may signal at once, and the default SIGTERM/SIGHUP action would kill us
    # without draining. A SIGHUP that arrives while starting is honoured once started.
    hup = SignalLatch(lambda: loop.create_task(svc.reload("SIGHUP")))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup)
    try:
        await svc.start()
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    hup.arm()
    await stop.wait()
    await svc.stop()
    return 0


def _runtime_ok() -> bool:
    from .startup import check_runtime

    problems = check_runtime()
    for p in problems:
        log.error("start-up check failed: %s", p)
    return not problems


def run_single(config: Config, path: str | None, watch: bool = False) -> int:
    """The whole proxy in this process (``--workers 1``)."""
    install_uvloop()
    setup_logging(config.logging)
    if not _runtime_ok():
        return 1
    return asyncio.run(_run_service(config, path, watch))


def serve(config: Config, path: str | None, workers: int = 1, watch: bool = False) -> int:
    """``watch``: reload when the configuration file (or a key file it names) changes."""
    if workers <= 1:
        try:
            return run_single(config, path, watch)
        except KeyboardInterrupt:
            return 0
    from .workers import supervise

    setup_logging(config.logging)
    if not _runtime_ok():
        return 1
    return supervise(config, path, workers, watch)
