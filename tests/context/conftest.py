"""Fixtures: real redis-server processes on free loopback ports, with kill/restart/pause helpers,
plus Sentinel and Cluster set-ups. Never the shared Redis on 6379."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from stickyproxy.context import ContextStore

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
# How long a fixture waits for a server to accept commands (or for a cluster to form).
START_DEADLINE = 10.0
# Commands that are bookkeeping of the test itself, not of the store.
BOOKKEEPING_COMMANDS = frozenset(
    {
        "info",
        "ping",
        "hello",
        "client|setinfo",
        "client|kill",
        "client|pause",
        "client|unpause",
        "cluster|info",
    }
)


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and, with_bus, port+10000 free too, for a cluster bus)."""
    for _ in range(200):
        port = random.randint(20000, 29999) if with_bus else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen = s.getsockname()[1]
        if with_bus:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", chosen + 10000))
                except OSError:
                    continue
        return chosen
    raise RuntimeError("no free port")


def wait_until(
    predicate: Callable[[], bool], *, deadline: float = START_DEADLINE, interval: float = 0.02
) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise AssertionError(f"condition not met within {deadline}s")


async def eventually(
    predicate: Callable[[], Any], *, deadline: float = 5.0, interval: float = 0.01
) -> None:
    """Poll ``predicate`` (sync or async) until truthy, failing after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline}s")
        await asyncio.sleep(interval)


def released(store: ContextStore, user: str) -> Callable[[], bool]:
    """Predicate: ``store`` no longer holds ``user`` (for :func:`eventually`)."""
    return lambda: not store.holds(user)


class RedisServer:
    """One redis-server process the test owns. ``kill``/``restart`` keep the port."""

    def __init__(
        self, workdir: Path, port: int | None = None, extra: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
            *self.extra,
        ]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(lambda: self.client().ping())

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2, **kwargs
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self, seconds: float) -> None:
        """CLIENT PAUSE ALL: every client's commands stall for ``seconds``."""
        with self.client() as c:
            c.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")

    def unpause(self) -> None:
        with self.client() as c:
            c.execute_command("CLIENT", "UNPAUSE")

    def commandstats(self) -> dict[str, int]:
        """Calls per command name since start (``INFO commandstats``)."""
        with self.client() as c:
            info = c.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}

    def store_calls(self, before: dict[str, int]) -> dict[str, int]:
        """Commands issued since ``before``, other than the test's own bookkeeping."""
        after = self.commandstats()
        return {
            name: calls - before.get(name, 0)
            for name, calls in after.items()
            if calls != before.get(name, 0) and name not in BOOKKEEPING_COMMANDS
        }


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[Callable[..., ContextStore]]:
    """Factory of (unstarted) stores on the test's server or another URL; all closed at teardown."""
    created: list[ContextStore] = []

    def factory(node_id: str, url: str | None = None, **kwargs: Any) -> ContextStore:
        kwargs.setdefault("namespace", "t")
        store = ContextStore(url or redis_server.url, node_id=node_id, **kwargs)
        created.append(store)
        return store

    yield factory
    for store in reversed(created):
        await store.close()


@pytest.fixture
async def stores(make_store: Callable[..., ContextStore]) -> Callable[..., Any]:
    """Async factory: ``store = await stores("A", **opts)`` returns a started store."""

    async def factory(node_id: str, url: str | None = None, **kwargs: Any) -> ContextStore:
        store = make_store(node_id, url, **kwargs)
        await store.start()
        return store

    return factory


class SentinelSetup:
    def __init__(
        self, master: RedisServer, sentinel_port: int, service: str, proc: subprocess.Popen[bytes]
    ) -> None:
        self.master = master
        self.sentinel_port = sentinel_port
        self.service = service
        self.proc = proc

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    master = RedisServer(tmp_path / "master")
    master.start()
    port = free_port()
    service = "ctxmaster"
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {tmp_path}\n"
        f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {service} 1000\n"
    )
    proc = subprocess.Popen(
        [REDIS_SERVER, str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def ready() -> bool:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as c:
                addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
            return bool(addr) and int(addr[1]) == master.port

        wait_until(ready)
        yield SentinelSetup(master, port, service, proc)
    finally:
        proc.kill()
        proc.wait(timeout=5)
        master.kill()


class ClusterSetup:
    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)


@pytest.fixture
def cluster_setup(tmp_path: Path) -> Iterator[ClusterSetup]:
    nodes: list[RedisServer] = []
    try:
        for i in range(3):
            node_dir = tmp_path / f"node{i}"
            node = RedisServer(
                node_dir,
                port=free_port(with_bus=True),
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            node.start()
            nodes.append(node)
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )

        def formed() -> bool:
            for n in nodes:
                with n.client() as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
            return True

        wait_until(formed, deadline=20)
        yield ClusterSetup(nodes)
    finally:
        for n in nodes:
            n.kill()


class TcpProxy:
    """An asyncio TCP relay in front of a Redis server, for fault injection.

    ``reply_delay`` holds every server→client chunk back that long (order kept); ``block()``
    closes every relayed connection and refuses new ones until ``unblock()``;
    ``drop_requests`` swallows client→server chunks (a request lost before reaching Redis);
    ``stall()`` stops relaying in both directions without closing anything (a connection
    that died silently) until ``unstall()``.
    ``requests_seen`` counts client→server chunks received, ``replies_seen`` server→client
    chunks received from Redis (before any delay).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.reply_delay = 0.0
        self.blocked = False
        self.requests_seen = 0
        self.replies_seen = 0
        self.drop_requests = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.blocked:
            client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self._writers.update((client_w, server_w))

        async def upstream() -> None:
            while data := await client_r.read(65536):
                self.requests_seen += 1
                await self._flowing.wait()
                if self.drop_requests:
                    continue
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                self.replies_seen += 1
                if self.reply_delay:
                    await asyncio.sleep(self.reply_delay)
                await self._flowing.wait()
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except Exception:
            pass
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for w in (client_w, server_w):
                w.close()
                self._writers.discard(w)

    def block(self) -> None:
        self.blocked = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def unblock(self) -> None:
        self.blocked = False

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.unstall()
        self.block()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            # Python 3.11 waits here for every accepted transport; all were aborted above, but
            # one accepted during the stall may close only later. Never hang a teardown on it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()


@pytest.fixture
async def tcp_proxy(redis_server: RedisServer) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


# How long the sentinels wait before judging a master down. At 1000 ms a CPU-starved new master
# (2 shared cores, a loaded run) looked down right after a kill -9 failover, and the spurious
# second failover promoted the restarted, empty old master during its first sync
# (test_double_failover.py shows the sequence). 2000 ms keeps such spurious failovers rare; the
# tests that assert no loss through a kill -9 run on DURABLE_SERVERS, where one is harmless.
SENTINEL_DOWN_AFTER_MS = 2000
# Server persistence under which a restarted node still holds every write it acknowledged
# (fsync before the reply): the configuration docs/context.md states for wait_replicas.
DURABLE_SERVERS = ["--appendonly", "yes", "--appendfsync", "always"]


class SentinelHA:
    """A master, one replica and three sentinels (quorum 2), all on loopback, in a temp dir."""

    SERVICE = "ctxha"

    def __init__(self, workdir: Path, server_extra: list[str] | None = None) -> None:
        self.workdir = workdir
        self.server_extra = list(server_extra or [])
        # Each server and sentinel logs into the test's temp dir (read them after a surprise).
        self.servers = [
            RedisServer(
                workdir / "a", extra=[*self.server_extra, "--logfile", str(workdir / "a.log")]
            ),
            RedisServer(workdir / "b"),
        ]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def start(self) -> None:
        first, second = self.servers
        first.start()
        second.extra = [
            *self.server_extra,
            "--logfile",
            str(self.workdir / "b.log"),
            "--replicaof",
            "127.0.0.1",
            str(first.port),
        ]
        second.start()
        wait_until(lambda: self._link_up(second))
        for i, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
                f"logfile {self.workdir / f'sentinel{i}.log'}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {first.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.SERVICE} 5000\n"
            )
            self.sentinel_procs.append(
                subprocess.Popen(
                    [REDIS_SERVER, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        # Every sentinel sees the master, the replica and the two other sentinels.
        wait_until(lambda: all(self._sentinel_ready(p) for p in self.sentinel_ports), deadline=20)

    @staticmethod
    def _link_up(replica: RedisServer) -> bool:
        with replica.client() as c:
            return c.info("replication").get("master_link_status") == "up"

    def _sentinel_ready(self, port: int) -> bool:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as c:
            state = c.sentinel_master(self.SERVICE)
            return int(state["num-other-sentinels"]) == 2 and int(state["num-slaves"]) == 1

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[i], socket_timeout=2)

    def master_port(self) -> int:
        """The master's port as the newest sentinel configuration says."""
        best = (-1, 0)
        for port in self.sentinel_ports:
            try:
                with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as c:
                    state = c.sentinel_master(self.SERVICE)
            except redis.RedisError:
                continue
            best = max(best, (int(state.get("config-epoch", 0)), int(state["port"])))
        return best[1]

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            proc.kill()
            proc.wait(timeout=5)
        for server in self.servers:
            server.kill()


@pytest.fixture
def sentinel_ha(tmp_path: Path) -> Iterator[SentinelHA]:
    setup = SentinelHA(tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def durable_sentinel_ha(tmp_path: Path) -> Iterator[SentinelHA]:
    """``sentinel_ha`` with AOF and ``appendfsync always``: a killed node restarts with its data."""
    setup = SentinelHA(tmp_path, server_extra=DURABLE_SERVERS)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


class ClusterHA:
    """Three masters and three replicas (``redis-cli --cluster create --cluster-replicas 1``),
    with ``cluster-require-full-coverage no`` so a dead master stops only its own slots, as
    docs/context.md advises."""

    def __init__(self, workdir: Path) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(6):
            node_dir = workdir / f"node{i}"
            self.nodes.append(
                RedisServer(
                    node_dir,
                    port=free_port(with_bus=True),
                    extra=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-replica-validity-factor",
                        "0",
                        "--cluster-require-full-coverage",
                        "no",
                    ],
                )
            )

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        wait_until(self._formed, deadline=30)

    def _formed(self) -> bool:
        for node in self.nodes:
            with node.client() as c:
                if c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
                    return False
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
        return len(self.masters()) == 3

    def masters(self) -> list[RedisServer]:
        found = []
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                with node.client() as c:
                    if c.info("replication")["role"] == "master":
                        found.append(node)
            except redis.RedisError:
                continue
        return found

    def node_id(self, node: RedisServer) -> str:
        with node.client() as c:
            return c.execute_command("CLUSTER", "MYID").decode()

    def owner(self, key: str) -> RedisServer:
        """The master that serves ``key``'s slot now, as a live master reports it."""
        with self.masters()[0].client() as c:
            slot = c.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no owner for {key}")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture
def cluster_ha(tmp_path: Path) -> Iterator[ClusterHA]:
    setup = ClusterHA(tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


class StaleProbe:
    """Counts stale reads: ``writer`` keeps changing ``users`` (taking them over) while
    ``reader`` keeps reading them. A read that started at t and returned a value older than one
    ``writer`` had acknowledged before t is stale; its age is t minus that acknowledgement."""

    def __init__(self, writer: ContextStore, reader: ContextStore, users: list[str]) -> None:
        self.writer, self.reader, self.users = writer, reader, users
        self.acked: dict[str, list[tuple[float, int]]] = {u: [] for u in users}
        self.reads = 0
        self.stale_ages: list[float] = []
        self.errors = 0

    def _newest_before(self, user: str, t: float) -> tuple[float, int] | None:
        found = None
        for at, n in self.acked[user]:
            if at < t:
                found = (at, n)
        return found

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(self._write(stop), self._read(stop))

    async def _write(self, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            user = self.users[i % len(self.users)]
            i += 1

            def bump(ctx: dict[str, Any]) -> int:
                ctx["n"] = ctx.get("n", 0) + 1
                return int(ctx["n"])

            try:
                n = await self.writer.update(user, bump)
                self.acked[user].append((time.monotonic(), n))
            except Exception:  # noqa: BLE001 - counted; the probe measures reads
                self.errors += 1
            await asyncio.sleep(0.02)

    async def _read(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for user in self.users:
                started = time.monotonic()
                try:
                    value = (await self.reader.get(user)).get("n", 0)
                except Exception:  # noqa: BLE001 - a refusal is not a stale read
                    self.errors += 1
                    continue
                self.reads += 1
                newest = self._newest_before(user, started)
                if newest is not None and value < newest[1]:
                    self.stale_ages.append(started - newest[0])
            await asyncio.sleep(0.002)
