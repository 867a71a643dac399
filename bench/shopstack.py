"""Redis, instances of the example shop and a stickyproxy in front of them, for the shop and
failover benchmarks. Every process runs in its own process group and stops with the stack."""

from __future__ import annotations

import contextlib
import json
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from .procs import LOOPBACK, START_TIMEOUT, Server, free_ports, spawn_server, wait_until_accepting
from .targets import REPO_ROOT, python_env

EXAMPLES = REPO_ROOT / "examples"
REDIS_BINARY = "redis-server"
# Python processes importing aiohttp, redis and prometheus_client at once on a busy machine.
APP_START_TIMEOUT = 60.0
# High enough that no benchmark user is ever refused: the Redis-backed limiter still does its
# INCR on every request in stateless mode, which is the cost being measured.
NO_REFUSAL_RATE_LIMIT = 1_000_000
HTTP_TIMEOUT = 5.0
STICKY_KEY_HEADER = "X-User-Id"
# Header no client sends: with it as the only key source every request is keyless and the
# proxy spreads them round-robin.
NEVER_SENT_HEADER = "X-Bench-No-Key"
# Where bench/shopapp.py answers the Redis calls its process has made.
COUNTS_PATH = "/_bench/redis"


@dataclass
class ShopApp:
    id: str
    port: int
    server: Server

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@dataclass(frozen=True)
class Health:
    interval: str = "1s"
    timeout: str = "500ms"
    rise: int = 2
    fall: int = 2


def start_redis(workdir: Path, stack: contextlib.ExitStack, name: str = "redis") -> str:
    """A private redis-server without persistence on a free port; returns its URL."""
    (port,) = free_ports(1)
    argv = [
        REDIS_BINARY,
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    server = spawn_server(name, argv, workdir, stack)
    wait_until_accepting(server, [port], START_TIMEOUT)
    return f"redis://{LOOPBACK}:{port}/0"


def shop_argv(
    port: int, node_id: str, redis_url: str, *, stateless: bool, counted: bool
) -> list[str]:
    module = "bench.shopapp" if counted else "shop"
    return [
        sys.executable,
        "-m",
        module,
        "--port",
        str(port),
        "--node-id",
        node_id,
        "--redis",
        redis_url,
        "--rate-limit",
        str(NO_REFUSAL_RATE_LIMIT),
    ] + (["--stateless"] if stateless else [])


def spawn_shop(
    workdir: Path,
    stack: contextlib.ExitStack,
    node_id: str,
    port: int,
    redis_url: str,
    *,
    stateless: bool,
    counted: bool,
) -> ShopApp:
    argv = shop_argv(port, node_id, redis_url, stateless=stateless, counted=counted)
    server = spawn_server(node_id, argv, workdir, stack, python_env(EXAMPLES))
    return ShopApp(node_id, port, server)


def start_shops(
    workdir: Path,
    stack: contextlib.ExitStack,
    ids: Sequence[str],
    redis_url: str,
    *,
    stateless: bool,
    counted: bool,
) -> list[ShopApp]:
    """All instances at once, then wait until each accepts connections."""
    ports = free_ports(len(ids))
    apps = [
        spawn_shop(workdir, stack, node_id, port, redis_url, stateless=stateless, counted=counted)
        for node_id, port in zip(ids, ports)
    ]
    for app in apps:
        wait_until_accepting(app.server, [app.port], APP_START_TIMEOUT)
    return apps


def proxy_config(
    port: int,
    apps: Sequence[ShopApp],
    *,
    sticky: bool,
    health: Health | None = None,
    admin_port: int | None = None,
) -> str:
    key = STICKY_KEY_HEADER if sticky else NEVER_SENT_HEADER
    backends = "\n".join(f'[[backends]]\nid = "{a.id}"\nurl = "{a.url}"\n' for a in apps)
    admin = (
        f'host = "{LOOPBACK}"\nport = {admin_port}' if admin_port is not None else "enabled = false"
    )
    if health is None:
        health_section = "enabled = false"
    else:
        health_section = (
            f'path = "/healthz"\ninterval = "{health.interval}"\n'
            f'timeout = "{health.timeout}"\nrise = {health.rise}\n'
            f"fall = {health.fall}"
        )
    return f"""[listen]
host = "{LOOPBACK}"
port = {port}

[admin]
{admin}

[routing]
keys = [{{ from = "header", name = "{key}" }}]
no_key = "round-robin"

[health]
{health_section}

[logging]
access = "off"

{backends}"""


def start_proxy(
    workdir: Path, stack: contextlib.ExitStack, name: str, config: str, ports: Sequence[int]
) -> Server:
    """`stickyproxy run` with `config`, once it accepts connections on every one of `ports`."""
    path = workdir / f"{name}.toml"
    path.write_text(config)
    argv = [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(path)]
    server = spawn_server(name, argv, workdir, stack, python_env())
    wait_until_accepting(server, list(ports), START_TIMEOUT)
    return server


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return json.loads(response.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return response.read().decode()


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one Prometheus metric, keyed by their label text ('' when unlabelled)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        rest = head[len(name) :]
        if rest and not rest.startswith("{"):
            continue
        out[rest.strip("{}")] = float(value)
    return out


def _label(labels: str, name: str) -> str | None:
    for pair in labels.split(","):
        key, _, value = pair.partition("=")
        if key == name:
            return value.strip('"')
    return None


def acquisitions(metrics_text: str) -> dict[str, float]:
    """stickyctx_acquisitions_total by reason, from an instance's /metrics."""
    samples = metric_values(metrics_text, "stickyctx_acquisitions_total")
    out: dict[str, float] = {}
    for labels, value in samples.items():
        reason = _label(labels, "reason")
        if reason is not None:
            out[reason] = out.get(reason, 0) + value
    return out


def context_counters(metrics_text: str) -> dict[str, Any]:
    """The context library's acquisitions by reason, takeovers received and write conflicts."""

    def total(name: str) -> float:
        return sum(metric_values(metrics_text, name).values())

    return {
        "acquisitions": acquisitions(metrics_text),
        "takeovers_received": total("stickyctx_takeovers_received_total"),
        "conflicts": total("stickyctx_conflicts_total"),
    }


def shop_requests(metrics_text: str, routes: Sequence[str]) -> float:
    """Requests the shop answered on `routes` (shop_requests_total), any status."""
    samples = metric_values(metrics_text, "shop_requests_total")
    return sum(value for labels, value in samples.items() if _label(labels, "route") in routes)


def scrape(app: ShopApp) -> str:
    return get_text(app.url + "/metrics")


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=HTTP_TIMEOUT)


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started, from INFO commandstats (commands that
    Lua scripts run inside the server included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_").upper(): int(v["calls"]) for name, v in stats.items()}
