"""Redis URLs and clients: plain, TLS, Sentinel and Cluster, all with short timeouts, a bounded
pool that callers wait on for at most the call timeout, and no library-level retries (the store
decides what is retried).

URL forms:

* ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://…`` (TLS), ``unix://path``:
  a single server; query options are passed to redis-py.
* ``redis+sentinel://[[user]:password@]host:port[,host:port…]/service_name[/db][?options]``
  (``rediss+sentinel://`` for TLS to the master and the sentinels). The credentials are the
  master's; ``sentinel_username`` / ``sentinel_password`` query options are the sentinels'.
* ``redis+cluster://[[user]:password@]host:port[,host:port…][/]`` (``rediss+cluster://`` for
  TLS): the listed nodes are startup nodes. ``redis://host:port`` with ``cluster=True`` is the same.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .errors import ConfigError
from .retry import backoff_delay

log = logging.getLogger("stickyproxy.context")

Kind = Literal["single", "sentinel", "cluster"]
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
# The takeover listener's socket must outlive its ping interval without a read timing out.
LISTENER_SOCKET_TIMEOUT = 2.0
# Sentinel events (Sentinel docs, "Pub/Sub messages"). "+switch-master" ends a failover:
# "<name> <old-ip> <old-port> <new-ip> <new-port>". "+failover-state-send-slaveof-noone" comes
# one sentinel tick (~100 ms) *before* the leader promotes the chosen replica:
# "slave <id> <ip> <port> @ <name> <master-ip> <master-port>". "-failover-abort-*" ends one
# that failed: "master <name> <ip> <port>".
SWITCH_MASTER_CHANNEL = "+switch-master"
PROMOTING_CHANNEL = "+failover-state-send-slaveof-noone"
ABORT_PATTERN = "-failover-abort-*"
# How long a sentinel watcher blocks in one read; a closed connection is noticed at once.
SENTINEL_READ_WAIT = 1.0
SENTINEL_BACKOFF_BASE = 0.05
SENTINEL_BACKOFF_CAP = 2.0

_SINGLE_SCHEMES = {"redis": False, "rediss": True, "unix": False}
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


@dataclass(frozen=True)
class RedisTarget:
    kind: Kind
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    options: dict[str, str] = field(default_factory=dict)


def _split_host(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"redis url: bad host {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"redis url: empty host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"redis url: bad port in {text!r}")
    return host, int(port_text)


def parse_redis_url(url: str, *, cluster: bool = False) -> RedisTarget:
    """Classify and decompose ``url`` (see the module docstring). Pure: no I/O."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"redis url: no scheme in {url!r}")
    if scheme in _SINGLE_SCHEMES and not cluster:
        return RedisTarget(kind="single", url=url, ssl=_SINGLE_SCHEMES[scheme])
    if scheme in _SINGLE_SCHEMES and scheme != "unix":
        scheme = "rediss+cluster" if _SINGLE_SCHEMES[scheme] else "redis+cluster"
    if scheme not in _SENTINEL_SCHEMES and scheme not in _CLUSTER_SCHEMES:
        raise ConfigError(
            f"redis url: unsupported scheme {scheme!r} (redis, rediss, unix, redis+sentinel, "
            "rediss+sentinel, redis+cluster, rediss+cluster)"
        )
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user_text, has_colon, pass_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(pass_text) if has_colon else None
    options = dict(parse_qsl(query))
    is_sentinel = scheme in _SENTINEL_SCHEMES
    default_port = DEFAULT_SENTINEL_PORT if is_sentinel else DEFAULT_PORT
    hosts = tuple(_split_host(part, default_port) for part in netloc.split(",") if part)
    if not hosts:
        raise ConfigError(f"redis url: no hosts in {url!r}")
    segments = [unquote(s) for s in path.split("/") if s]
    if is_sentinel:
        if not segments:
            raise ConfigError(
                f"redis url: {scheme} needs /service_name, e.g. {scheme}://h1:26379,h2:26379/mymaster"
            )
        service, db_parts = segments[0], segments[1:]
        if len(db_parts) > 1 or (db_parts and not db_parts[0].isdigit()):
            raise ConfigError(f"redis url: bad database in {url!r}")
        return RedisTarget(
            kind="sentinel",
            url=url,
            hosts=hosts,
            service=service,
            db=int(db_parts[0]) if db_parts else 0,
            username=username,
            password=password,
            ssl=_SENTINEL_SCHEMES[scheme],
            options=options,
        )
    if segments and segments != ["0"]:
        raise ConfigError(f"redis url: a cluster has only database 0, got {url!r}")
    return RedisTarget(
        kind="cluster",
        url=url,
        hosts=hosts,
        username=username,
        password=password,
        ssl=_CLUSTER_SCHEMES[scheme],
        options=options,
    )


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel-resolved master connections from a pool that callers wait on with a timeout."""


class _NewestConfigSentinel(Sentinel):
    """Asks every sentinel at once and follows the newest configuration epoch.

    redis-py takes the first sentinel that answers; during a failover the sentinels that did
    not lead it keep naming the old master until the leader's hello messages reach them (up to
    seconds), so a store could reconnect to the demoted master. The leader bumps the epoch when
    it promotes, so the highest epoch names the newest master."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        replies = await asyncio.gather(
            *(s.sentinel_masters() for s in self.sentinels), return_exceptions=True
        )
        best: tuple[int, str, int] | None = None
        errors = []
        for sentinel, reply in zip(self.sentinels, replies, strict=True):
            if isinstance(reply, BaseException):
                errors.append(f"{sentinel}: {reply!r}")
                continue
            state = reply.get(service_name) if isinstance(reply, dict) else None
            if not state or not self.check_master_state(state, service_name):
                continue
            epoch = int(state.get("config-epoch", 0) or 0)
            if best is None or epoch > best[0]:
                best = (epoch, state["ip"], int(state["port"]))
        if best is None:
            raise MasterNotFoundError(f"No master found for {service_name!r}: {', '.join(errors)}")
        return best[1], best[2]


class _LastReleasedFirstNode(ClusterNode):
    """A ClusterNode that hands out the most recently released free connection first."""

    __slots__ = ()

    def acquire_connection(self) -> Any:
        if self._free:
            return self._free.pop()
        return super().acquire_connection()


class _AskSafeCluster(RedisCluster):
    """RedisCluster whose ASK redirects reach the importing node on the connection that got ASKING.

    Cause of "ClusterError: TTL exhausted" during a slot migration (redis-py 8.2.0, the newest
    release; see RedisCluster._execute_command and ClusterNode.execute_command): on ASK the
    client sends ``ASKING`` with ``target_node.execute_command("ASKING")``, which takes a free
    connection from the *left* of the node's deque and puts it back on the *right*, then sends
    the command with a second ``execute_command``, which takes the next free connection from
    the left. With more than one free connection to the importing node, the command runs on a
    connection that never received ASKING (the flag holds for the next command on the same
    connection only): the importing node answers MOVED back to the source, the source answers
    ASK again, until the 16 redirects are spent.

    Workaround, narrow: nodes reached through ``get_node`` (which the ASK path uses to find the
    importing node) become ``_LastReleasedFirstNode`` (same slots, only ``acquire_connection``
    differs), so they take the most recently released free connection. Nothing can run between
    the ASKING call releasing its connection and the command acquiring one (no await in
    between), so the command gets the connection that carries ASKING. Other nodes and every
    other client in the process are untouched. tests/context/test_cluster_failures.py fails
    without it.
    """

    def get_node(
        self, host: str | None = None, port: int | None = None, node_name: str | None = None
    ) -> Any:
        node = super().get_node(host, port, node_name)
        if type(node) is ClusterNode:
            node.__class__ = _LastReleasedFirstNode
        return node


class RedisClients:
    """The command client, and fresh pub/sub connections for the takeover listener."""

    def __init__(
        self,
        target: RedisTarget,
        command: Redis | RedisCluster,
        *,
        timeout: float,
        listener: Redis | None = None,
    ) -> None:
        self.target = target
        self.command = command
        self._timeout = timeout
        self._listener = listener
        # Cluster: the listener connects to one node at a time, moving on after each failure.
        self._node_cycle: itertools.cycle[tuple[str, int]] = itertools.cycle(
            target.hosts or [("", 0)]
        )
        self._node_client: Redis | None = None

    async def drop_master_connections(self) -> None:
        """Sentinel: close every connection to the (old) master, in use or idle, so each call
        after this resolves the master again; a call in flight on one fails (outcome unknown)."""
        for client in (self.command, self._listener):
            if isinstance(client, Redis):
                await client.connection_pool.disconnect(inuse_connections=True)

    async def watch_master_switches(self, on_switch: Callable[[str, str], Awaitable[None]]) -> None:
        """Sentinel: subscribe to every sentinel's failover events and await
        ``on_switch(channel, text)`` for each about this service. Runs until cancelled."""
        if self.target.kind != "sentinel":
            return
        await asyncio.gather(
            *(self._watch_one(host, port, on_switch) for host, port in self.target.hosts)
        )

    async def _watch_one(
        self, host: str, port: int, on_switch: Callable[[str, str], Awaitable[None]]
    ) -> None:
        failures = 0
        kwargs: dict[str, Any] = {
            "socket_timeout": max(self._timeout, LISTENER_SOCKET_TIMEOUT),
            "socket_connect_timeout": self._timeout,
            "socket_keepalive": True,
            "retry": _no_retry(),
        }
        if "sentinel_username" in self.target.options:
            kwargs["username"] = self.target.options["sentinel_username"]
        if "sentinel_password" in self.target.options:
            kwargs["password"] = self.target.options["sentinel_password"]
        if self.target.ssl:
            kwargs["ssl"] = True
        while True:
            client = Redis(host=host, port=port, **kwargs)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(SWITCH_MASTER_CHANNEL, PROMOTING_CHANNEL)
                await pubsub.psubscribe(ABORT_PATTERN)
                failures = 0
                while True:
                    message = await pubsub.get_message(timeout=SENTINEL_READ_WAIT)
                    if message is None or message["type"] not in ("message", "pmessage"):
                        continue
                    channel, text = (_text(message["channel"]), _text(message["data"]))
                    if sentinel_event_service(channel, text) == self.target.service:
                        await on_switch(channel, text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "sentinel %s:%d watcher disconnected: %s", host, port, exc or type(exc).__name__
                )
            finally:
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
            failures += 1
            await asyncio.sleep(
                backoff_delay(failures, SENTINEL_BACKOFF_BASE, SENTINEL_BACKOFF_CAP)
            )

    async def new_pubsub(self) -> PubSub:
        """A pub/sub object that will open its own connection on first use."""
        if self._listener is not None:
            return self._listener.pubsub(ignore_subscribe_messages=False)
        if isinstance(self.command, RedisCluster):
            known = [(str(n.host), int(n.port)) for n in self.command.get_nodes()]
            if known and set(known) != set(self.target.hosts):
                self._node_cycle = itertools.cycle(known)
        if self._node_client is not None:
            await self._node_client.aclose()
        host, port = next(self._node_cycle)
        self._node_client = Redis(
            host=host, port=port, **_listener_kwargs(self.target, self._timeout)
        )
        return self._node_client.pubsub(ignore_subscribe_messages=False)

    async def aclose(self) -> None:
        if self._node_client is not None:
            await self._node_client.aclose()
        if self._listener is not None:
            await self._listener.aclose()
        await self.command.aclose()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def sentinel_event_service(channel: str, text: str) -> str | None:
    """The master name a Sentinel event is about (see the channel constants). Pure."""
    words = text.split(" ")
    if channel == SWITCH_MASTER_CHANNEL:
        return words[0] if len(words) == 5 else None
    if channel == PROMOTING_CHANNEL:
        return words[words.index("@") + 1] if "@" in words[:-1] else None
    if channel.startswith("-failover-abort-"):
        return words[1] if len(words) >= 2 and words[0] == "master" else None
    return None


def _common_kwargs(target: RedisTarget, timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        "retry": _no_retry(),
        "health_check_interval": 0,
    }
    if target.username is not None:
        kwargs["username"] = target.username
    if target.password is not None:
        kwargs["password"] = target.password
    return kwargs


def _listener_kwargs(target: RedisTarget, timeout: float) -> dict[str, Any]:
    kwargs = _common_kwargs(target, timeout)
    kwargs["socket_timeout"] = max(timeout, LISTENER_SOCKET_TIMEOUT)
    if target.ssl:
        kwargs["ssl"] = True
    return kwargs


def build_clients(target: RedisTarget, *, timeout: float, pool_size: int) -> RedisClients:
    """Clients for ``target``. Nothing connects until first use."""
    if target.kind == "single":
        pool = BlockingConnectionPool.from_url(
            target.url,
            max_connections=pool_size,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            retry=_no_retry(),
            health_check_interval=0,
        )
        listener = Redis.from_url(
            target.url,
            socket_timeout=max(timeout, LISTENER_SOCKET_TIMEOUT),
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            retry=_no_retry(),
        )
        return RedisClients(target, Redis.from_pool(pool), timeout=timeout, listener=listener)
    if target.kind == "sentinel":
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": _no_retry(),
        }
        if "sentinel_username" in target.options:
            sentinel_kwargs["username"] = target.options["sentinel_username"]
        if "sentinel_password" in target.options:
            sentinel_kwargs["password"] = target.options["sentinel_password"]
        if target.ssl:
            sentinel_kwargs["ssl"] = True
        sentinel = _NewestConfigSentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        assert target.service is not None
        common = _common_kwargs(target, timeout)
        command = sentinel.master_for(
            target.service,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=pool_size,
            timeout=timeout,
            db=target.db,
            ssl=target.ssl,
            **common,
        )
        listener_kwargs = _listener_kwargs(target, timeout)
        listener_kwargs.pop("ssl", None)
        listener = sentinel.master_for(
            target.service, db=target.db, ssl=target.ssl, **listener_kwargs
        )
        return RedisClients(target, command, timeout=timeout, listener=listener)
    common = _common_kwargs(target, timeout)
    common.pop("health_check_interval")
    cluster = _AskSafeCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        max_connections=pool_size,
        ssl=target.ssl,
        **common,
    )
    return RedisClients(target, cluster, timeout=timeout)
