"""Configurations and command lines for the backends and for each proxy under test."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .procs import LOOPBACK

REPO_ROOT = Path(__file__).resolve().parent.parent

BODY = "ok\n"
BACKEND_IDS = ("app-1", "app-2", "app-3")
BACKEND_HEADER = "X-Backend"
USER_HEADER = "X-User-Id"

WORKER_CONNECTIONS = 4096
UPSTREAM_KEEPALIVE = 64
KEEPALIVE_REQUESTS = 1_000_000
KEEPALIVE_TIMEOUT = "60s"
HAPROXY_MAXCONN = 4096
HAPROXY_TIMEOUTS = {
    "connect": "1s",
    "client": "30s",
    "server": "30s",
    "http-request": "10s",
    "http-keep-alive": "60s",
    "tunnel": "60s",
}
NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
# stickyproxy run from its pure-Python sources: measured only when the installed build is
# compiled (otherwise it is the same program as the "stickyproxy" target).
INTERPRETED = "stickyproxy-py"


def stickyproxy_version() -> str:
    """The installed version and which build of the hot path it runs."""
    from importlib import metadata

    from stickyproxy.compiled import build

    try:
        version = metadata.version("stickyproxy")
    except metadata.PackageNotFoundError:
        version = "not installed"
    return f"{version} ({build()})"


def default_kinds() -> tuple[TargetKind, ...]:
    from stickyproxy.compiled import build

    return tuple(k for k in TARGET_KINDS.values() if k.name != INTERPRETED or build() == "compiled")


@dataclass(frozen=True)
class Launch:
    """How to start one server: its command line, and the configuration it reads."""

    program: str
    argv: list[str]
    config_path: Path
    config: str
    env: dict[str, str] = field(default_factory=dict)

    def write(self) -> None:
        self.config_path.write_text(self.config)


Renderer = Callable[[Path, int, Sequence[int], int], Launch]


@dataclass(frozen=True)
class TargetKind:
    name: str
    tool: str | None
    optional: bool
    render: Renderer


def _nginx_main(prefix: Path, workers: int, http_body: str) -> str:
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in NGINX_TEMP_PATHS)
    return f"""worker_processes {workers};
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

http {{
    access_log off;
    client_max_body_size 0;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout {KEEPALIVE_TIMEOUT};
{temp_paths}

{http_body}
}}
"""


def _nginx_launch(prefix: Path, config: str) -> Launch:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    argv = [
        "nginx",
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]
    return Launch("nginx", argv, conf, config)


def backends_launch(workdir: Path, ports: Sequence[int]) -> Launch:
    """One single-worker nginx answering `BODY` on each of `ports`, naming itself in a header."""
    servers = "\n\n".join(
        f"""    server {{
        listen {LOOPBACK}:{port};
        location / {{
            add_header {BACKEND_HEADER} {backend_id};
            return 200 "{BODY.encode("unicode_escape").decode()}";
        }}
    }}"""
        for backend_id, port in zip(BACKEND_IDS, ports)
    )
    body = f"    default_type text/plain;\n\n{servers}"
    prefix = workdir / "backends"
    return _nginx_launch(prefix, _nginx_main(prefix, 1, body))


def nginx_launch(workdir: Path, port: int, backend_ports: Sequence[int], workers: int) -> Launch:
    upstream_servers = "\n".join(f"        server {LOOPBACK}:{p};" for p in backend_ports)
    body = f"""    map $http_upgrade $connection_upgrade {{
        default upgrade;
        "" "";
    }}

    upstream apps {{
        hash $http_{USER_HEADER.lower().replace("-", "_")} consistent;
{upstream_servers}
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}

    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://apps;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}"""
    prefix = workdir / f"nginx-w{workers}"
    return _nginx_launch(prefix, _nginx_main(prefix, workers, body))


def haproxy_launch(workdir: Path, port: int, backend_ports: Sequence[int], workers: int) -> Launch:
    timeouts = "\n".join(f"    timeout {name} {value}" for name, value in HAPROXY_TIMEOUTS.items())
    servers = "\n".join(
        f"    server {backend_id} {LOOPBACK}:{p}"
        for backend_id, p in zip(BACKEND_IDS, backend_ports)
    )
    config = f"""global
    nbthread {workers}
    maxconn {HAPROXY_MAXCONN}

defaults
    mode http
    option http-keep-alive
    http-reuse always
{timeouts}

frontend proxy
    bind {LOOPBACK}:{port}
    default_backend apps

backend apps
    balance hdr({USER_HEADER})
    hash-type consistent
{servers}
"""
    conf = workdir / f"haproxy-w{workers}.cfg"
    return Launch("haproxy", ["haproxy", "-f", str(conf), "-db"], conf, config)


def stickyproxy_launch(
    workdir: Path, port: int, backend_ports: Sequence[int], workers: int, tree: Path | None = None
) -> Launch:
    """``stickyproxy run`` from this checkout, or from ``tree`` (a copy of the sources put
    first on PYTHONPATH) when given."""
    backends = "\n".join(
        f"""[[backends]]
id = "{backend_id}"
url = "http://{LOOPBACK}:{p}"
"""
        for backend_id, p in zip(BACKEND_IDS, backend_ports)
    )
    config = f"""[listen]
host = "{LOOPBACK}"
port = {port}

[admin]
enabled = false

[routing]
keys = [{{ from = "header", name = "{USER_HEADER}" }}]

{backends}
[health]
enabled = false

[limits]
pool_max_idle = {UPSTREAM_KEEPALIVE}
pool_max_requests = {KEEPALIVE_REQUESTS}

[logging]
access = "off"
"""
    name = "stickyproxy" if tree is None else INTERPRETED
    conf = workdir / f"{name}-w{workers}.toml"
    argv = [
        sys.executable,
        "-m",
        "stickyproxy.cli",
        "run",
        "-c",
        str(conf),
        "--workers",
        str(workers),
    ]
    env = python_env() if tree is None else python_env(tree)
    return Launch(f"{name} run", argv, conf, config, env)


def stickyproxy_interpreted_launch(
    workdir: Path, port: int, backend_ports: Sequence[int], workers: int
) -> Launch:
    """The same stickyproxy from a copy of its sources without the compiled modules, so
    one run measures what compiling the hot path (stickyproxy/compiled.py) buys."""
    tree = workdir / "interpreted"
    if not tree.exists():
        shutil.copytree(
            REPO_ROOT / "stickyproxy",
            tree / "stickyproxy",
            ignore=shutil.ignore_patterns("*.so", "__pycache__"),
        )
    return stickyproxy_launch(workdir, port, backend_ports, workers, tree)


# -- the kill drill (bench/killdrill.py) ------------------------------------------------------
# Each proxy configured as its users would for backends that die under load: consistent hashing
# on X-User-Id, an idempotent request that failed retried on the next server, health checked
# every 500 ms (fall 2, rise 1), pooled keep-alive connections to the backends.
DRILL_UPSTREAM_KEEPALIVE = 32
DRILL_HEALTH_INTERVAL_MS = 500
DRILL_HEALTH_FALL = 2
DRILL_HEALTH_RISE = 1
# NGINX: the first try plus two more, as HAProxy's `retries 2` and stickyproxy's default
# `retries.attempts = 2`.
DRILL_NGINX_TRIES = 3
# Open-source NGINX has no active checks: passive only, a server failing twice is skipped for
# fail_timeout, then tried again (the nearest it has to fall 2 / rise 1).
DRILL_NGINX_MAX_FAILS = DRILL_HEALTH_FALL
DRILL_NGINX_FAIL_TIMEOUT = "1s"
DRILL_HAPROXY_RETRIES = 2


def nginx_drill_launch(workdir: Path, port: int, backend_ports: Sequence[int]) -> Launch:
    """NGINX for the kill drill: `hash … consistent`, `max_fails`, `proxy_next_upstream error
    timeout http_502` with 3 tries, 32 pooled connections."""
    servers = "\n".join(
        f"        server {LOOPBACK}:{p} max_fails={DRILL_NGINX_MAX_FAILS} "
        f"fail_timeout={DRILL_NGINX_FAIL_TIMEOUT};"
        for p in backend_ports
    )
    body = f"""    upstream apps {{
        hash $http_{USER_HEADER.lower().replace("-", "_")} consistent;
{servers}
        keepalive {DRILL_UPSTREAM_KEEPALIVE};
    }}

    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://apps;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502;
            proxy_next_upstream_tries {DRILL_NGINX_TRIES};
        }}
    }}"""
    prefix = workdir / "nginx-drill"
    return _nginx_launch(prefix, _nginx_main(prefix, 1, body))


def haproxy_drill_launch(
    workdir: Path, port: int, backend_ports: Sequence[int], stats_port: int
) -> Launch:
    """HAProxy for the kill drill: `balance hdr(X-User-Id)`, `hash-type consistent`,
    `option redispatch`, `retries 2`, `retry-on conn-failure empty-response response-timeout`,
    HTTP checks every 500 ms (fall 2, rise 1), `http-reuse always`; its stats page (CSV) on
    `stats_port` counts the retries and redispatches it made."""
    timeouts = "\n".join(f"    timeout {name} {value}" for name, value in HAPROXY_TIMEOUTS.items())
    servers = "\n".join(
        f"    server {backend_id} {LOOPBACK}:{p}"
        for backend_id, p in zip(BACKEND_IDS, backend_ports)
    )
    check = (
        f"check inter {DRILL_HEALTH_INTERVAL_MS} fall {DRILL_HEALTH_FALL} rise {DRILL_HEALTH_RISE}"
    )
    config = f"""global
    nbthread 1
    maxconn {HAPROXY_MAXCONN}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    option redispatch
    retries {DRILL_HAPROXY_RETRIES}
    retry-on conn-failure empty-response response-timeout
{timeouts}

frontend proxy
    bind {LOOPBACK}:{port}
    default_backend apps

backend apps
    balance hdr({USER_HEADER})
    hash-type consistent
    option httpchk GET /
    default-server {check}
{servers}

listen stats
    bind {LOOPBACK}:{stats_port}
    stats enable
    stats uri /stats
"""
    conf = workdir / "haproxy-drill.cfg"
    return Launch("haproxy", ["haproxy", "-f", str(conf), "-db"], conf, config)


def stickyproxy_drill_launch(
    workdir: Path, port: int, backend_ports: Sequence[int], admin_port: int
) -> Launch:
    """stickyproxy for the kill drill: its defaults (retries, passive health, pool, the
    X-User-Id key), health checks every 500 ms (fall 2, rise 1; a check's timeout, which may
    not exceed the interval, equal to it, as HAProxy's is without `timeout check`), the
    admin listener (for /metrics) on `admin_port`."""
    backends = "\n".join(
        f"""[[backends]]
id = "{backend_id}"
url = "http://{LOOPBACK}:{p}"
"""
        for backend_id, p in zip(BACKEND_IDS, backend_ports)
    )
    config = f"""[listen]
host = "{LOOPBACK}"
port = {port}

[admin]
host = "{LOOPBACK}"
port = {admin_port}

[health]
interval = "{DRILL_HEALTH_INTERVAL_MS}ms"
timeout = "{DRILL_HEALTH_INTERVAL_MS}ms"
fall = {DRILL_HEALTH_FALL}
rise = {DRILL_HEALTH_RISE}

{backends}"""
    conf = workdir / "stickyproxy-drill.toml"
    argv = [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(conf)]
    return Launch("stickyproxy run", argv, conf, config, python_env())


def extract_sources(revision: str, tree: Path) -> None:
    """The stickyproxy package at ``revision`` (``git archive``) extracted under ``tree``,
    to be put first on a proxy's PYTHONPATH (interpreted: no compiled modules come with
    it). Raises OSError, subprocess.SubprocessError or tarfile.TarError."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision, "stickyproxy"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse odd members
            tar.extractall(tree, filter="data")
        else:
            tar.extractall(tree)  # this repository's own sources


def python_env(*extra_paths: Path) -> dict[str, str]:
    """PYTHONPATH for a Python child: this checkout (and `extra_paths`) first."""
    paths = [str(p) for p in extra_paths] + [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(filter(None, paths))}


TARGET_KINDS = {
    kind.name: kind
    for kind in (
        TargetKind("nginx", "nginx", optional=False, render=nginx_launch),
        TargetKind("haproxy", "haproxy", optional=False, render=haproxy_launch),
        TargetKind("stickyproxy", None, optional=True, render=stickyproxy_launch),
        TargetKind(INTERPRETED, None, optional=True, render=stickyproxy_interpreted_launch),
    )
}
BASELINE = "nginx"
