"""NGINX and HAProxy as reference peers for the differential suite.

Each is configured the way an operator would for stickyproxy's job (sticky routing by a
consistent hash of ``X-User-Id``, keep-alive connections to the backend so a pooled upstream
connection is reused by the next client), runs in the foreground as a child process on a
free loopback port, with its configuration, pid file, logs and temporary files in a
directory of the test's own, and is killed at teardown.

Timeouts are short (the suite waits on them when a peer holds a request open), and one
worker / one thread keeps a single pool of idle upstream connections, so the connection a
warm-up request leaves idle is the one the next request gets.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from support.net import free_port

LOOPBACK = "127.0.0.1"
USER_HEADER = "X-User-Id"
# How long a peer may take to accept connections after it is started.
START_DEADLINE = 10.0
# Seconds a peer waits on a client or a backend before giving up (kept short: a test that
# leaves a request open waits for this, never for a peer's defaults of a minute).
PEER_TIMEOUT_S = 2

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def missing() -> list[str]:
    """The peer programs that are not installed."""
    return [
        name
        for name, path in (("nginx", NGINX), ("haproxy", HAPROXY))
        if not os.access(path, os.X_OK)
    ]


# ---------------------------------------------------------------------------------------
# configurations (pure)


def nginx_config(prefix: Path, port: int, backend_port: int) -> str:
    hash_var = "$http_" + USER_HEADER.lower().replace("-", "_")
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # workers of a master started as root would run as "nobody" and could not use the
    # test's private directory
    user = "user root;\n" if os.geteuid() == 0 else ""
    t = f"{PEER_TIMEOUT_S}s"
    return f"""{user}worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
{temp}
    client_header_timeout {t};
    client_body_timeout {t};
    send_timeout {t};
    keepalive_timeout 30s;

    upstream apps {{
        hash {hash_var} consistent;
        server {LOOPBACK}:{backend_port};
        keepalive 16;
    }}

    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://apps;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_connect_timeout 1s;
            proxy_read_timeout {t};
            proxy_send_timeout {t};
        }}
    }}
}}
"""


def haproxy_config(prefix: Path, port: int, backend_port: int) -> str:
    t = f"{PEER_TIMEOUT_S}s"
    return f"""global
    nbthread 1
    maxconn 256
    pidfile {prefix / "haproxy.pid"}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 1s
    timeout client {t}
    timeout server {t}
    timeout http-request {t}
    timeout http-keep-alive 30s

frontend proxy
    bind {LOOPBACK}:{port}
    default_backend apps

backend apps
    balance hdr({USER_HEADER})
    hash-type consistent
    server app {LOOPBACK}:{backend_port}
"""


# ---------------------------------------------------------------------------------------
# processes


@dataclass
class Peer:
    name: str
    port: int
    prefix: Path
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.prefix / "output.log"

    def output(self) -> str:
        parts = []
        for p in (self.log, self.prefix / "error.log"):
            try:
                parts.append(p.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.proc = None


def _argv(name: str, prefix: Path, conf: Path) -> list[str]:
    if name == "nginx":
        return [
            NGINX,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ]
    return [HAPROXY, "-f", str(conf), "-db"]


def start(name: str, workdir: Path, backend_port: int, attempts: int = 3) -> Peer:
    """Start ``nginx`` or ``haproxy`` in front of ``backend_port``; ready when it returns.
    A free port can be taken by someone else before the peer binds it: then another one."""
    error = ""
    for attempt in range(attempts):
        try:
            return _start_once(name, workdir / f"{name}-{attempt}", backend_port)
        except RuntimeError as e:
            error = str(e)
    raise RuntimeError(error)


def _start_once(name: str, prefix: Path, backend_port: int) -> Peer:
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    render = nginx_config if name == "nginx" else haproxy_config
    conf = prefix / ("nginx.conf" if name == "nginx" else "haproxy.cfg")
    conf.write_text(render(prefix, port, backend_port))
    peer = Peer(name, port, prefix)
    with open(peer.log, "wb") as out:
        peer.proc = subprocess.Popen(
            _argv(name, prefix, conf),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    end = time.monotonic() + START_DEADLINE
    while True:
        if peer.proc.poll() is not None:
            out_text = peer.output()
            peer.stop()
            raise RuntimeError(f"{name} exited at start:\n{out_text}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return peer
        except OSError:
            pass
        if time.monotonic() > end:
            out_text = peer.output()
            peer.stop()
            raise RuntimeError(f"{name} did not listen within {START_DEADLINE}s:\n{out_text}")
        time.sleep(0.02)
