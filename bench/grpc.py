"""gRPC and HTTP/2 benchmark (#21): stickyproxy beside NGINX in the same run, h2load driving
both.

    python -m bench.grpc [--smoke] [--duration S] [--rounds N] [--source REV] [--out FILE]

Two measures, each through stickyproxy (1 worker, ``listen.h2c = true``) and through NGINX
(``worker_processes 1``, ``listen PORT http2``: prior knowledge), back to back in
interleaved rounds:

- ``grpc``: gRPC unary calls (``POST /bench.Echo/Unary``, ``content-type: application/grpc``,
  ``te: trailers``, a length-prefixed message as the body) to three grpcio servers (grpc.aio,
  a generic handler on raw bytes, each in its own process), the user key in the
  ``x-user-id`` metadata. stickyproxy speaks HTTP/2 to them (``protocol = "h2"``); NGINX
  uses ``grpc_pass`` to an upstream with ``hash $http_x_user_id consistent``. h2load sends
  the same header fields on every request, so each user is its own h2load process:
  GRPC_USERS of them at once, one user per backend of the proxy measured (found by the
  probe below), each with GRPC_CONNECTIONS connections of GRPC_STREAMS concurrent streams.
- ``h2``: h2c GETs with many streams on few connections (bench/h2.py's load: 4 connections x
  16 streams over 1000 users in ``?user=uN``) to the HTTP/1.1 backends of the data-plane
  benchmark; stickyproxy as in bench/h2.py, NGINX with ``proxy_pass`` over HTTP/1.1 and
  ``hash $arg_user consistent``.

A gRPC error is an HTTP 200 with a ``grpc-status`` trailer, which h2load counts as success.
So before any load one call per probe user goes through each proxy with the grpcio client
(status OK asserted, and each user kept on one backend, named by the reply), and after
every run the backends' own count of calls answered (method ``Served``, asked directly) must
be at least h2load's successes. The h2 listeners are probed with a small h2 client
(status 200, body, each user on one backend).

stickyproxy runs from this checkout, uncommitted changes included (the results name the
commit and the files changed); ``--source REV`` runs it from the sources at git revision REV
instead (interpreted build only).

Printed, and written as JSON: req/s per target (median of the rounds), stickyproxy / NGINX
(median of the per-round ratios, and the ratio of the medians), and the proxy's CPU per
request (its process tree's CPU time from /proc over the run, divided by the requests
completed), beside the backends' (all three together; for gRPC divided by the calls they
answered), which shows when the backends rather than the proxy set the pace. Not pass/fail on speed. When NGINX cannot load a configuration (``nginx -t``;
e.g. no grpc module), that part runs stickyproxy alone and says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .console import progress as default_progress
from .cpu import CpuMeter, per_request_us
from .dataplane import NGINX_BACKENDS, PYTHON_BACKENDS, start_backends
from .h2 import H2_CONNECTIONS, H2_STREAMS, THREADS, h2_launch, parse_h2load
from .h2 import USERS as H2_USERS
from .procs import LOOPBACK, Server, free_ports, spawn_server, tool_version, wait_until_accepting
from .targets import (
    BACKEND_HEADER,
    BACKEND_IDS,
    BODY,
    KEEPALIVE_REQUESTS,
    REPO_ROOT,
    UPSTREAM_KEEPALIVE,
    USER_HEADER,
    Launch,
    _nginx_launch,
    _nginx_main,
    extract_sources,
    python_env,
    stickyproxy_launch,
    stickyproxy_version,
)
from .tls import paired

RESULTS = Path(__file__).resolve().parent / "results"

DURATION, SMOKE_DURATION = 10.0, 1.0  # seconds per measured run
ROUNDS, SMOKE_ROUNDS = 5, 1
WARMUP_SECONDS = 2.0  # per measure and target, not counted; none in smoke
START_TIMEOUT = 20.0
H2LOAD_GRACE = 30.0  # seconds past the run's duration before an h2load is given up
# gRPC load: one h2load process per user (h2load sends the same fields on every request),
# one user per backend, 2 x 16 streams each: 96 calls in flight.
GRPC_USERS = 3
GRPC_CONNECTIONS = 2
GRPC_STREAMS = 16
PROBE_USERS, PROBE_TIMEOUT = 30, 5.0

SERVICE, UNARY, SERVED = "bench.Echo", "Unary", "Served"
UNARY_PATH = f"/{SERVICE}/{UNARY}"
SERVED_PATH = f"/{SERVICE}/{SERVED}"
REQUEST_PAYLOAD = b"stickyproxy-bench"  # the request message (raw bytes, no protobuf)
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
USER_METADATA = USER_HEADER.lower()  # gRPC metadata keys are lower-case header names

NGINX, STICKYPROXY = "nginx", "stickyproxy"
TARGETS = (STICKYPROXY, NGINX)
GRPC, H2 = "grpc", "h2"
MEASURES = (GRPC, H2)
UNITS = {GRPC: "calls/s", H2: "req/s"}


class Skip(Exception):
    """The benchmark cannot run here (h2load, grpcio or, for a full run, nginx missing)."""


class ProbeError(Exception):
    """A proxy answered a probe wrongly or did not keep a user on one backend."""


@dataclass(frozen=True)
class Plan:
    duration: float
    rounds: int
    warmup: float
    smoke: bool
    grpc_users: int = GRPC_USERS
    grpc_connections: int = GRPC_CONNECTIONS
    grpc_streams: int = GRPC_STREAMS
    source: str | None = None  # a git revision: stickyproxy from its sources there


def make_plan(
    smoke: bool,
    duration: float | None = None,
    rounds: int | None = None,
    source: str | None = None,
) -> Plan:
    return Plan(
        duration=duration or (SMOKE_DURATION if smoke else DURATION),
        rounds=rounds or (SMOKE_ROUNDS if smoke else ROUNDS),
        warmup=0.0 if smoke else WARMUP_SECONDS,
        smoke=smoke,
        source=source,
    )


def grpc_message(payload: bytes) -> bytes:
    """One gRPC length-prefixed message: compressed flag 0, 4-byte big-endian length, payload
    (gRPC over HTTP/2, "Length-Prefixed-Message")."""
    return struct.pack(">BI", 0, len(payload)) + payload


# -- the gRPC backends ---------------------------------------------------------------------------


def _grpc_module() -> Any:
    try:
        import grpc
    except ImportError:
        raise Skip("grpcio is not installed (pip install grpcio)") from None
    return grpc


async def serve_backend(port: int, name: str) -> None:
    """A grpc.aio server on `port`: Unary answers `name` (so a probe sees which backend
    answered), Served the number of Unary calls answered so far (ASCII)."""
    grpc = _grpc_module()
    served = 0
    reply = name.encode()

    async def unary(request: bytes, context: Any) -> bytes:
        nonlocal served
        served += 1
        return reply

    async def count(request: bytes, context: Any) -> bytes:
        return str(served).encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            UNARY: grpc.unary_unary_rpc_method_handler(unary),
            SERVED: grpc.unary_unary_rpc_method_handler(count),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    await server.wait_for_termination()


def backend_argv(port: int, name: str) -> list[str]:
    return [sys.executable, "-m", "bench.grpc", "--serve-backend", str(port), name]


def start_grpc_backends(
    workdir: Path, stack: contextlib.ExitStack
) -> tuple[list[int], list[Server]]:
    ports = free_ports(len(BACKEND_IDS))
    servers = [
        spawn_server(f"grpc-{name}", backend_argv(port, name), workdir, stack, python_env())
        for name, port in zip(BACKEND_IDS, ports)
    ]
    for server, port in zip(servers, ports):
        wait_until_accepting(server, [port], START_TIMEOUT)
    return ports, servers


def call(channel: Any, path: str, user: str | None = None) -> bytes:
    """One unary call; raises grpc.RpcError unless its status is OK."""
    grpc = _grpc_module()
    metadata = ((USER_METADATA, user),) if user else None
    reply, outcome = channel.unary_unary(path).with_call(
        REQUEST_PAYLOAD, metadata=metadata, timeout=PROBE_TIMEOUT
    )
    if outcome.code() != grpc.StatusCode.OK:  # with_call raises first; kept as the assertion
        raise ProbeError(f"{path}: status {outcome.code()}")
    return reply


def served_counts(ports: Sequence[int]) -> int:
    """Unary calls the backends have answered, asked directly (not through a proxy)."""
    grpc = _grpc_module()
    total = 0
    for port in ports:
        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            total += int(call(channel, SERVED_PATH))
    return total


def probe_grpc(port: int, users: int = PROBE_USERS) -> dict[str, str]:
    """`users` users twice each through the proxy on `port` with the grpcio client: every call
    status OK, each user answered by one backend, more than one backend used. Returns the
    backend of each user."""
    grpc = _grpc_module()
    seen: dict[str, str] = {}
    try:
        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            for _ in range(2):
                for i in range(users):
                    user = f"u{i}"
                    backend = call(channel, UNARY_PATH, user).decode(errors="replace")
                    if backend not in BACKEND_IDS:
                        raise ProbeError(f"user {user}: reply {backend!r}")
                    if seen.setdefault(user, backend) != backend:
                        raise ProbeError(f"user {user} went to {seen[user]}, then to {backend}")
    except grpc.RpcError as e:
        raise ProbeError(f"gRPC call failed: {e.code()}: {e.details()}") from None
    if len(set(seen.values())) < 2:
        raise ProbeError(f"all {users} probe users went to one backend")
    return seen


def pick_users(placement: dict[str, str], count: int) -> list[str]:
    """`count` users spread evenly over the backends of `placement` (user -> backend): the
    first user of each backend in turn, then the next, and so on."""
    by_backend: dict[str, list[str]] = {}
    for user, backend in placement.items():
        by_backend.setdefault(backend, []).append(user)
    queues = [by_backend[b] for b in sorted(by_backend)]
    out: list[str] = []
    depth = 0
    while len(out) < count and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: count - len(out)]
        depth += 1
    return out


# -- the h2 probe --------------------------------------------------------------------------------


def probe_h2(port: int, users: int = PROBE_USERS) -> dict[str, str]:
    """`users` GETs (``/?user=uN``, the key h2load sends) as concurrent streams on one h2c
    connection, twice: each 200 with the backends' body, each user from one backend."""
    import h2.config
    import h2.connection
    import h2.events

    seen: dict[str, str] = {}
    with socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for _ in range(2):
            streams: dict[int, dict[str, Any]] = {}
            for i in range(users):
                sid = conn.get_next_available_stream_id()
                streams[sid] = {"user": f"u{i}", "headers": {}, "body": b"", "ended": False}
                conn.send_headers(
                    sid,
                    [
                        (":method", "GET"),
                        (":scheme", "http"),
                        (":authority", f"{LOOPBACK}:{port}"),
                        (":path", f"/?user=u{i}"),
                    ],
                    end_stream=True,
                )
            sock.sendall(conn.data_to_send())
            while not all(s["ended"] for s in streams.values()):
                data = sock.recv(65536)
                if not data:
                    raise ProbeError("the proxy closed the h2 connection")
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        streams[event.stream_id]["headers"] = {
                            k.decode().lower(): v.decode() for k, v in event.headers
                        }
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id]["body"] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        streams[event.stream_id]["ended"] = True
                    elif isinstance(event, h2.events.StreamReset):
                        raise ProbeError(f"stream reset: {event.error_code!r}")
                sock.sendall(conn.data_to_send())
            for s in streams.values():
                status = s["headers"].get(":status")
                backend = s["headers"].get(BACKEND_HEADER.lower(), "")
                if status != "200" or s["body"].decode(errors="replace") != BODY or not backend:
                    raise ProbeError(
                        f"user {s['user']}: status {status}, body {s['body'][:60]!r}, "
                        f"{BACKEND_HEADER} {backend!r}"
                    )
                if seen.setdefault(s["user"], backend) != backend:
                    raise ProbeError(f"user {s['user']} went to {seen[s['user']]}, then {backend}")
    if len(set(seen.values())) < 2:
        raise ProbeError(f"all {users} probe users went to one backend")
    return seen


# -- the proxies' configurations -------------------------------------------------------------------


def nginx_grpc_launch(workdir: Path, port: int, backend_ports: Sequence[int]) -> Launch:
    """NGINX, 1 worker: h2c on `port` (`listen PORT http2`), `grpc_pass` to the backends by
    `hash $http_x_user_id consistent`, keep-alive connections to them."""
    servers = "\n".join(f"        server {LOOPBACK}:{p};" for p in backend_ports)
    body = f"""    upstream grpc_apps {{
        hash $http_{USER_HEADER.lower().replace("-", "_")} consistent;
{servers}
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}

    server {{
        listen {LOOPBACK}:{port} http2;
        location / {{
            grpc_pass grpc://grpc_apps;
        }}
    }}"""
    prefix = workdir / "nginx-grpc"
    return _nginx_launch(prefix, _nginx_main(prefix, 1, body))


def nginx_h2_launch(workdir: Path, port: int, backend_ports: Sequence[int]) -> Launch:
    """NGINX, 1 worker: h2c on `port`, `proxy_pass` over HTTP/1.1 keep-alive to the
    backends by `hash $arg_user consistent` (the key bench/h2.py's load carries)."""
    servers = "\n".join(f"        server {LOOPBACK}:{p};" for p in backend_ports)
    body = f"""    upstream h2_apps {{
        hash $arg_user consistent;
{servers}
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}

    server {{
        listen {LOOPBACK}:{port} http2;
        location / {{
            proxy_pass http://h2_apps;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    prefix = workdir / "nginx-h2"
    return _nginx_launch(prefix, _nginx_main(prefix, 1, body))


def stickyproxy_grpc_launch(workdir: Path, port: int, backend_ports: Sequence[int]) -> Launch:
    """stickyproxy as in the data-plane benchmark (1 worker, key X-User-Id), with h2c on and
    every backend spoken to with HTTP/2 (`protocol = "h2"`)."""
    base = stickyproxy_launch(workdir, port, backend_ports, 1)
    config = base.config.replace(f"port = {port}\n", f"port = {port}\nh2c = true\n", 1)
    for p in backend_ports:
        url = f'url = "http://{LOOPBACK}:{p}"\n'
        assert url in config, "bench/targets.py changed its [[backends]] tables"
        config = config.replace(url, f'{url}protocol = "h2"\n', 1)
    path = workdir / "stickyproxy-grpc.toml"
    argv = [str(path) if a == str(base.config_path) else a for a in base.argv]
    return dataclasses.replace(base, config_path=path, config=config, argv=argv)


def nginx_config_error(launch: Launch) -> str | None:
    """What `nginx -t` says is wrong with `launch`'s configuration (written), or None."""
    argv = [a for a in launch.argv if a not in ("-g", "daemon off;")] + ["-t"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nginx -t: {type(e).__name__}: {e}"
    if out.returncode == 0:
        return None
    lines = [ln for ln in (out.stderr or out.stdout).splitlines() if "emerg" in ln or "error" in ln]
    return (lines[0] if lines else (out.stderr or out.stdout).strip()[-300:]) or "nginx -t failed"


# -- one measured run ------------------------------------------------------------------------------


def h2load_duration(seconds: float) -> str:
    """h2load's -D takes whole numbers only, so in milliseconds."""
    return f"{round(seconds * 1000)}ms"


def grpc_h2load_argv(port: int, user: str, data: Path, duration: float, plan: Plan) -> list[str]:
    argv = ["h2load", "-t", str(THREADS), "-c", str(plan.grpc_connections)]
    argv += ["-m", str(plan.grpc_streams), "-D", h2load_duration(duration), "-d", str(data)]
    for field in (*GRPC_HEADERS, f"{USER_METADATA}: {user}"):
        argv += ["-H", field]
    return argv + [f"http://{LOOPBACK}:{port}{UNARY_PATH}"]


def h2_h2load_argv(uris: Path, duration: float) -> list[str]:
    """bench/h2.py's h2 load: H2_CONNECTIONS x H2_STREAMS over the URIs in `uris`."""
    return [
        "h2load",
        "-t",
        str(THREADS),
        "-i",
        str(uris),
        "-D",
        h2load_duration(duration),
        "-c",
        str(H2_CONNECTIONS),
        "-m",
        str(H2_STREAMS),
    ]


def run_h2loads(argvs: Sequence[list[str]], duration: float, server: Server) -> dict[str, Any]:
    """The h2load processes of `argvs` at once; their figures summed (req/s: each process's
    own rate, summed) and the proxy's CPU per request over the run."""
    meter = CpuMeter(server.proc.pid)
    meter.start()
    procs = [
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=duration + H2LOAD_GRACE)
            if p.returncode != 0:
                raise RuntimeError(f"h2load exited {p.returncode}: {err.strip()[-500:]}")
            outputs.append(parse_h2load(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    used = meter.stop()
    total = {k: sum(o[k] for o in outputs) for k in outputs[0]}
    return {
        "rate": total["rps"],
        "count": total["done"],
        "succeeded": total["succeeded"],
        "failed": total["failed"] + total["errored"] + total["timeout"],
        "non_2xx": total["non_2xx"],
        "processes": len(outputs),
        **per_request_us(used, total["done"]),
    }


@dataclass
class Endpoint:
    """One proxy's listener for one measure."""

    target: str
    measure: str
    server: Server
    port: int
    users: list[str] = dataclasses.field(default_factory=list)  # gRPC: a user per h2load


@dataclass
class Bench:
    """What a run needs beside the endpoints: the request body, the URI lists, the gRPC
    backends (asked for their counts), each measure's backend processes (for their CPU)."""

    data: Path
    uris: dict[str, Path]
    grpc_ports: list[int]
    backend_pids: dict[str, list[int]]


def backend_cpu_us(meters: Sequence[CpuMeter], requests: int) -> float | None:
    """CPU of the backends' processes (all of them) per request, from `meters` started
    before the run."""
    total = sum(m.stop().total_s for m in meters)
    return total * 1e6 / requests if requests > 0 and total > 0 else None


def measure(ep: Endpoint, bench: Bench, plan: Plan, duration: float) -> dict[str, Any]:
    meters = [CpuMeter(pid) for pid in bench.backend_pids.get(ep.measure, ())]
    if ep.measure == H2:
        for m in meters:
            m.start()
        r = run_h2loads([h2_h2load_argv(bench.uris[ep.target], duration)], duration, ep.server)
        r["backend_cpu_us"] = backend_cpu_us(meters, r["count"])
        return r
    before = served_counts(bench.grpc_ports)
    argvs = [grpc_h2load_argv(ep.port, u, bench.data, duration, plan) for u in ep.users]
    for m in meters:
        m.start()
    r = run_h2loads(argvs, duration, ep.server)
    r["backend_served"] = served_counts(bench.grpc_ports) - before
    r["backend_cpu_us"] = backend_cpu_us(meters, r["backend_served"])
    if r["backend_served"] < r["succeeded"]:
        raise RuntimeError(
            f"{ep.target}: h2load counted {r['succeeded']} successful calls, the backends "
            f"answered {r['backend_served']}: some 200s were gRPC errors"
        )
    return r


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "rate": statistics.median(r["rate"] for r in runs),
        "rounds": [r["rate"] for r in runs],
        "cpu_us": median("cpu_us"),
        "backend_cpu_us": median("backend_cpu_us"),
        "count": sum(r["count"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
    }


def compare(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """stickyproxy over NGINX for each measure, round by round (bench/tls.py's `paired`)."""
    out = []
    for m in MEASURES:
        pair = paired(rows.get(f"{m}/{STICKYPROXY}"), rows.get(f"{m}/{NGINX}"))
        if pair is not None:
            out.append({"measure": m, **pair})
    return out


def _describe(r: dict[str, Any], unit: str) -> str:
    text = f"{r['rate']:10,.0f} {unit}"
    text += f", {r['cpu_us']:.0f} us CPU each" if r.get("cpu_us") else ", cpu n/a"
    if r.get("backend_cpu_us"):
        text += f" (backends {r['backend_cpu_us']:.0f})"
    if "backend_served" in r:
        text += f", backends answered {r['backend_served']:,} >= {r['succeeded']:,} succeeded"
    if r["failed"] or r["non_2xx"]:
        text += f", {r['failed']:,} failed, {r['non_2xx']:,} non-2xx"
    return text


# -- the run ---------------------------------------------------------------------------------------


def start_endpoints(
    workdir: Path,
    stack: contextlib.ExitStack,
    with_nginx: bool,
    progress: Callable[[str], None],
    grpc_users: int = GRPC_USERS,
    tree: Path | None = None,
) -> tuple[list[Endpoint], Bench, dict[str, str], list[str]]:
    """Every backend and proxy (stickyproxy from the sources in `tree` when given), started
    and probed; `grpc_users` load users picked for each gRPC listener. Returns the endpoints,
    what the runs need, the proxies' configurations and what was skipped (and why)."""
    skipped: list[str] = []
    configs: dict[str, str] = {}
    grpc_ports, grpc_servers = start_grpc_backends(workdir, stack)
    progress(f"gRPC backends (grpc.aio) on {', '.join(map(str, grpc_ports))}")
    http_ports, _, http_server = start_backends(
        workdir, stack, NGINX_BACKENDS if with_nginx else PYTHON_BACKENDS
    )
    sp_grpc, sp_h2, ng_grpc, ng_h2 = free_ports(4)
    launches = {
        (GRPC, STICKYPROXY, sp_grpc): stickyproxy_grpc_launch(workdir, sp_grpc, grpc_ports),
        (H2, STICKYPROXY, sp_h2): h2_launch(workdir, sp_h2, http_ports),
    }
    if with_nginx:
        launches[(GRPC, NGINX, ng_grpc)] = nginx_grpc_launch(workdir, ng_grpc, grpc_ports)
        launches[(H2, NGINX, ng_h2)] = nginx_h2_launch(workdir, ng_h2, http_ports)
    spawned = []
    for (m, target, port), launch in launches.items():
        if target == STICKYPROXY and tree is not None:
            launch = dataclasses.replace(launch, env=python_env(tree))
        launch.write()
        if target == NGINX:
            error = nginx_config_error(launch)
            if error is not None:
                skipped.append(f"{m} through NGINX: nginx -t refused its configuration: {error}")
                progress(f"{m}: NGINX skipped: {error}")
                continue
        configs[f"{m}/{target}"] = launch.config
        server = spawn_server(f"{target}-{m}", launch.argv, workdir, stack, launch.env)
        spawned.append(Endpoint(target, m, server, port))
    for ep in spawned:
        wait_until_accepting(ep.server, [ep.port], START_TIMEOUT)
    for ep in spawned:
        try:
            if ep.measure == GRPC:
                placement = probe_grpc(ep.port)
                ep.users = pick_users(placement, grpc_users)
                where = ", ".join(f"{u} on {placement[u]}" for u in ep.users)
                progress(f"grpc via {ep.target}: probe calls OK, sticky; load users {where}")
            else:
                placement = probe_h2(ep.port)
                used = len(set(placement.values()))
                progress(f"h2 via {ep.target}: probe 200s, sticky over {used} backends")
        except (ProbeError, OSError) as e:
            raise ProbeError(f"{ep.measure} via {ep.target}: {e}") from None
    data = workdir / "unary.bin"
    data.write_bytes(grpc_message(REQUEST_PAYLOAD))
    uris = {}
    for ep in spawned:
        if ep.measure == H2:
            uris[ep.target] = workdir / f"uris-{ep.target}.txt"
            uris[ep.target].write_text(
                "".join(f"http://{LOOPBACK}:{ep.port}/?user=u{i}\n" for i in range(H2_USERS))
            )
    pids = {GRPC: [s.proc.pid for s in grpc_servers], H2: [http_server.proc.pid]}
    return spawned, Bench(data, uris, grpc_ports, pids), configs, skipped


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def sources_at(workdir: Path, revision: str) -> Path:
    """The stickyproxy package at `revision`, extracted under `workdir`, to be put first on
    the proxies' PYTHONPATH: a run that the checkout's uncommitted edits do not touch. Only
    with the interpreted build (the extracted sources have no compiled modules)."""
    from stickyproxy.compiled import build

    if build() != "interpreted":
        raise Skip(f"--source needs the interpreted build; the installed one is {build()}")
    tree = workdir / "source"
    tree.mkdir(parents=True)
    try:
        extract_sources(revision, tree)
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as e:
        raise Skip(f"no stickyproxy sources at {revision} ({type(e).__name__}: {e})") from None
    return tree


def source_state(revision: str | None = None) -> dict[str, Any]:
    """The commit measured; without `revision` (the proxy runs from this checkout) also the
    files under stickyproxy/ changed from it, uncommitted changes being measured too."""
    if revision is not None:
        commit = _git("rev-parse", "--short", f"{revision}^{{commit}}").strip()
        return {"commit": commit or revision, "uncommitted": [], "from": f"git archive {revision}"}

    changed = _git("status", "--porcelain", "--", "stickyproxy")
    return {
        "commit": _git("rev-parse", "--short", "HEAD").strip() or "unknown",
        "from": "this checkout",
        "uncommitted": [line[3:] for line in changed.splitlines() if line.strip()],
    }


def run(
    plan: Plan, with_nginx: bool, progress: Callable[[str], None] = default_progress
) -> dict[str, Any]:
    """The benchmark: rows by measure and target (every round), comparisons, skips."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.monotonic()
    loadavg_before = os.getloadavg()
    skipped = [] if with_nginx else ["nginx is missing: stickyproxy alone, Python backends"]
    rows: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-grpc-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        tree = sources_at(workdir, plan.source) if plan.source else None
        endpoints, bench, configs, more = start_endpoints(
            workdir, stack, with_nginx, progress, plan.grpc_users, tree
        )
        skipped += more
        if plan.warmup:
            for warm in endpoints:
                measure(warm, bench, plan, plan.warmup)
            progress(f"warmed up every listener ({plan.warmup:g}s each)")
        for round_no in range(1, plan.rounds + 1):
            order = TARGETS if round_no % 2 else TARGETS[::-1]
            for m in MEASURES:
                for target in order:
                    at = [e for e in endpoints if (e.measure, e.target) == (m, target)]
                    if not at:
                        continue
                    ep = at[0]
                    if not ep.server.running:
                        raise RuntimeError(f"{target} ({m}) exited: {ep.server.describe_exit()}")
                    r = measure(ep, bench, plan, plan.duration)
                    row = rows.setdefault(
                        f"{m}/{target}", {"measure": m, "target": target, "runs": []}
                    )
                    row["runs"].append({"round": round_no, **r})
                    progress(
                        f"round {round_no}/{plan.rounds} {m:4} {target:11} {_describe(r, UNITS[m])}"
                    )
        users = {f"{e.measure}/{e.target}": e.users for e in endpoints if e.users}
    for row in rows.values():
        row["summary"] = summarize(row["runs"])
    return {
        "benchmark": "grpc",
        "started_at": started,
        "seconds": round(time.monotonic() - t0, 1),
        # the machine is shared: how busy it was (1, 5, 15 minutes) as the run began and ended
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "settings": {
            "duration_s": plan.duration,
            "rounds": plan.rounds,
            "warmup_s": plan.warmup,
            "smoke": plan.smoke,
            "workers": 1,
            "grpc": f"{plan.grpc_users} h2load processes (one user each) x "
            f"{plan.grpc_connections} connections x {plan.grpc_streams} streams",
            "grpc_request": f"POST {UNARY_PATH}, {len(grpc_message(REQUEST_PAYLOAD))}-byte body",
            "h2": f"{H2_CONNECTIONS} connections x {H2_STREAMS} streams, {H2_USERS} users",
            "h2load_threads": THREADS,
        },
        "grpc_users": users,
        "source": source_state(plan.source),
        "configs": configs,
        "tools": {
            "stickyproxy": stickyproxy_version(),
            "nginx": tool_version(["nginx", "-v"]) if with_nginx else "missing",
            "h2load": tool_version(["h2load", "--version"]),
            "grpcio": _grpc_module().__version__,
        },
        "rows": list(rows.values()),
        "comparisons": compare(rows),
        "skipped": skipped,
    }


def check(smoke: bool) -> bool:
    """Raise Skip when this machine cannot run the benchmark; whether NGINX is measured
    (a smoke run goes on without it)."""
    if shutil.which("h2load") is None:
        raise Skip("h2load is not installed (apt-get install nghttp2-client)")
    _grpc_module()
    with_nginx = shutil.which("nginx") is not None
    if not with_nginx and not smoke:
        raise Skip("nginx is not installed (apt-get install nginx)")
    return with_nginx


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for row in result["rows"]:
        s = row["summary"]
        cpu = f"{s['cpu_us']:.0f} us CPU/req" if s["cpu_us"] else "cpu n/a"
        if s.get("backend_cpu_us"):
            cpu += f" (backends {s['backend_cpu_us']:.0f})"
        lines.append(
            f"{row['measure']:4} {row['target']:11} median {s['rate']:,.0f} "
            f"{UNITS[row['measure']]}, {cpu}"
        )
    for c in result["comparisons"]:
        cpu = f"{c['cpu_ratio']:.2f}x" if c["cpu_ratio"] else "n/a"
        lines.append(
            f"{c['measure']:4} stickyproxy/NGINX {c['rate_ratio']:.2f}x the rate (rounds "
            + ", ".join(f"{x:.2f}" for x in c["round_ratios"])
            + f"; ratio of medians {c['ratio_of_medians']:.2f}x), {cpu} the CPU per request"
        )
    source = result.get("source") or {}
    if source.get("uncommitted"):
        lines.append(
            f"measured {source['commit']} with uncommitted changes to "
            + ", ".join(source["uncommitted"])
        )
    return lines + [f"skipped: {s}" for s in result["skipped"]]


def run_suite(settings: Any, skip: type[Exception]) -> dict[str, Any]:
    """For bench/__main__.py: settings has ``smoke``; `skip` is the suite's exception for a
    benchmark this machine cannot run."""
    try:
        with_nginx = check(settings.smoke)
    except Skip as e:
        raise skip(str(e)) from None
    result = run(make_plan(settings.smoke), with_nginx)
    for line in report_lines(result):
        default_progress(f"grpc: {line}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 s per run, 1 round")
    p.add_argument("--duration", type=float, default=None, help=f"seconds per run ({DURATION:g})")
    p.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds ({ROUNDS})")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument(
        "--source",
        metavar="REV",
        default=None,
        help="run stickyproxy from its sources at git revision REV (e.g. HEAD), not from this "
        "checkout with its uncommitted changes (interpreted build only)",
    )
    p.add_argument("--serve-backend", nargs=2, metavar=("PORT", "NAME"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_backend:
        asyncio.run(serve_backend(int(args.serve_backend[0]), args.serve_backend[1]))
        return 0
    try:
        with_nginx = check(args.smoke)
    except Skip as e:
        print(f"grpc: skipped: {e}", file=sys.stderr)
        return 2
    try:
        result = run(make_plan(args.smoke, args.duration, args.rounds, args.source), with_nginx)
    except Skip as e:
        print(f"grpc: skipped: {e}", file=sys.stderr)
        return 2
    for line in report_lines(result):
        default_progress(line)
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS) / "grpc.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    default_progress(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
