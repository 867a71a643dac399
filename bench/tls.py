"""TLS benchmark (#20): stickyproxy terminating TLS beside NGINX, same certificate, same run.

    python -m bench.tls [--smoke] [--out DIR]

One NGINX process (1 worker) and stickyproxy (1 worker per listener) in front of the same
three backends, each with a plain listener and a TLS listener per certificate (made by
trustme: ECDSA P-256, and RSA-2048 for the handshakes). Measured in interleaved rounds,
the two proxies back to back for each figure:

- ``plain``: keep-alive HTTP, wrk (the data-plane figure, in this run);
- ``keepalive``: keep-alive HTTPS, wrk on an https:// URL (one handshake per connection);
- ``reconnect``: HTTPS with ``Connection: close`` on every request (lua/reconnect.lua): wrk
  connects again after each answer and offers the last session, so these are *resumed*
  handshakes (TLS 1.3 PSK with a fresh key exchange, no certificate signature);
- ``handshake``: full handshakes, ``openssl s_time -new -www /`` in HANDSHAKE_CLIENTS
  processes at once: a new session on every connection (never resumed), one HTTP/1.0 GET.

CPU per request is the proxy's process tree's CPU time (/proc) over the run divided by the
requests (or connections) completed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import re
import shutil
import socket
import ssl
import statistics
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
from .procs import (
    LOOPBACK,
    Server,
    StartError,
    free_ports,
    spawn_server,
    tool_version,
    wait_until_accepting,
)
from .targets import (
    BACKEND_HEADER,
    BODY,
    KEEPALIVE_REQUESTS,
    UPSTREAM_KEEPALIVE,
    USER_HEADER,
    Launch,
    _nginx_launch,
    _nginx_main,
    extract_sources,
    stickyproxy_launch,
    stickyproxy_version,
)
from .wrk import (
    EXIT_GRACE,
    LUA_DIR,
    SEED,
    THREADS,
    USERS_SCRIPT,
    WrkError,
    run_argv,
)

RESULTS = Path(__file__).resolve().parent / "results"
RECONNECT_SCRIPT = LUA_DIR / "reconnect.lua"

DURATION, SMOKE_DURATION = 4.0, 1.0  # seconds per measured run (s_time counts whole s)
ROUNDS, SMOKE_ROUNDS = 5, 1
WARMUP_SECONDS = 2.0  # per listener, not counted; none in smoke
CONNECTIONS = 32  # wrk connections, as the dataplane benchmark
USERS = 10_000
# Concurrent full handshakes: s_time makes one connection at a time, so this many processes;
# more only adds client processes competing for the two cores (measured: 8 gave fewer
# handshakes/s than 4 against either proxy).
HANDSHAKE_CLIENTS = 4
PROBE_USERS, PROBE_TIMEOUT = 30, 5.0

NGINX, STICKYPROXY = "nginx", "stickyproxy"
# stickyproxy's sources from the commit before TLS was wired into the proxy (#20), run beside
# the current ones on plain HTTP: both from their pure-Python sources, so only when the
# installed build is interpreted too (a compiled build would not compare like with like).
PRE_TLS, PRE_TLS_COMMIT = "stickyproxy-pre-tls", "16b1723^"
TARGETS = (NGINX, STICKYPROXY, PRE_TLS)
PLAIN, KEEPALIVE, RECONNECT, HANDSHAKE = "plain", "keepalive", "reconnect", "handshake"
ECDSA, RSA = "ecdsa", "rsa"
KEY_NAMES = {ECDSA: "ECDSA P-256", RSA: "RSA-2048"}
# (mode, certificate) in the order each round measures them; None: no certificate.
MEASURES: tuple[tuple[str, str | None], ...] = (
    (PLAIN, None),
    (KEEPALIVE, ECDSA),
    (RECONNECT, ECDSA),
    (HANDSHAKE, ECDSA),
    (HANDSHAKE, RSA),
)
UNITS = {PLAIN: "req/s", KEEPALIVE: "req/s", RECONNECT: "req/s", HANDSHAKE: "handshakes/s"}
S_TIME_POLL = 0.005  # seconds between looks at the s_time processes
S_TIME_LINE = re.compile(
    r"(\d+) connections in [\d.]+s; [\d.]+ connections/user sec, "
    r"bytes read (\d+)"
)


class Skip(Exception):
    """The benchmark cannot run here (a tool or trustme is missing)."""


@dataclass(frozen=True)
class Plan:
    duration: float
    rounds: int
    warmup: float
    smoke: bool
    connections: int = CONNECTIONS
    users: int = USERS
    handshake_clients: int = HANDSHAKE_CLIENTS
    measures: tuple[tuple[str, str | None], ...] = MEASURES


def make_plan(smoke: bool) -> Plan:
    return Plan(
        duration=SMOKE_DURATION if smoke else DURATION,
        rounds=SMOKE_ROUNDS if smoke else ROUNDS,
        warmup=0.0 if smoke else WARMUP_SECONDS,
        smoke=smoke,
    )


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path


def make_certificates(workdir: Path, keys: Sequence[str]) -> dict[str, CertFiles]:
    """One CA and one leaf for localhost / 127.0.0.1 per key type, written as files."""
    import trustme

    kinds = {ECDSA: trustme.KeyType.ECDSA, RSA: trustme.KeyType.RSA}
    out = {}
    for name in keys:
        ca = trustme.CA(key_type=kinds[name])
        leaf = ca.issue_cert("localhost", LOOPBACK, key_type=kinds[name])
        files = CertFiles(
            workdir / f"{name}.crt", workdir / f"{name}.key", workdir / f"{name}-ca.pem"
        )
        files.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        files.key.write_bytes(leaf.private_key_pem.bytes())
        ca.cert_pem.write_to_path(str(files.ca))
        out[name] = files
    return out


# -- the proxies' configurations -------------------------------------------------------------


def nginx_tls_launch(
    workdir: Path,
    plain_port: int,
    tls_ports: dict[str, int],
    certs: dict[str, CertFiles],
    backend_ports: Sequence[int],
    access_log: Path | None = None,
) -> Launch:
    """One NGINX, 1 worker, proxying as in the dataplane benchmark (bench/targets.py) on a
    plain listener and one TLS listener per certificate: `ssl_protocols TLSv1.2 TLSv1.3`,
    keep-alive, its defaults otherwise (session tickets on, no session cache).
    `access_log` logs `$ssl_session_reused` of each TLS request (for tests; off in runs)."""
    upstream = "\n".join(f"        server {LOOPBACK}:{p};" for p in backend_ports)
    location = """        location / {
            proxy_pass http://apps;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""
    log = f"        access_log {access_log} reuse;\n" if access_log else ""
    servers = [f"    server {{\n        listen {LOOPBACK}:{plain_port};\n{location}\n    }}"]
    for name, port in tls_ports.items():
        servers.append(f"""    server {{
        listen {LOOPBACK}:{port} ssl;
        ssl_certificate {certs[name].cert};
        ssl_certificate_key {certs[name].key};
        ssl_protocols TLSv1.2 TLSv1.3;
{log}{location}
    }}""")
    body = f"""    log_format reuse '$ssl_session_reused $ssl_protocol';

    upstream apps {{
        hash $http_{USER_HEADER.lower().replace("-", "_")} consistent;
{upstream}
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}

""" + "\n\n".join(servers)
    prefix = workdir / "nginx-tls"
    return _nginx_launch(prefix, _nginx_main(prefix, 1, body))


def stickyproxy_tls_launch(
    workdir: Path,
    port: int,
    backend_ports: Sequence[int],
    cert: CertFiles | None,
    name: str,
    tree: Path | None = None,
) -> Launch:
    """stickyproxy as in the dataplane benchmark, 1 worker; with `cert`, its listener is TLS
    (`[listen.tls]` with the same files NGINX serves, every other TLS setting default); with
    `tree`, run from the sources there."""
    base = stickyproxy_launch(workdir, port, backend_ports, 1, tree)
    config = base.config
    if cert is not None:
        listen = f"port = {port}\n"
        config = config.replace(
            listen, f'{listen}\n[listen.tls]\ncert = "{cert.cert}"\nkey = "{cert.key}"\n', 1
        )
    path = workdir / f"stickyproxy-{name}.toml"
    argv = [str(path) if a == str(base.config_path) else a for a in base.argv]
    return dataclasses.replace(base, config_path=path, config=config, argv=argv)


def pre_tls_tree(workdir: Path) -> tuple[Path | None, str]:
    """The stickyproxy package at PRE_TLS_COMMIT, extracted under `workdir`; (None, why not)
    when it cannot be measured like with like."""
    from stickyproxy.compiled import build

    if build() != "interpreted":
        return None, f"the installed build is {build()}; the {PRE_TLS_COMMIT} sources are not"
    tree = workdir / "pre-tls"
    tree.mkdir()
    try:
        extract_sources(PRE_TLS_COMMIT, tree)
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as e:
        return None, f"no {PRE_TLS_COMMIT} sources ({type(e).__name__}: {e})"
    return tree, ""


# -- checks before any load --------------------------------------------------------------------


class ProbeError(Exception):
    """A listener answered wrongly, did not keep a user on one backend, or spoke no TLS."""


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def probe(port: int, ctx: ssl.SSLContext | None) -> dict[str, Any]:
    """PROBE_USERS users twice each over one keep-alive connection: 200 `ok`, each user from one
    backend; over TLS also the version and cipher negotiated, and an HTTP/1.0 GET without a
    key on a new connection (what `openssl s_time -www /` sends) answered 200."""
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(LOOPBACK, port, timeout=PROBE_TIMEOUT, context=ctx)
        if ctx is not None
        else http.client.HTTPConnection(LOOPBACK, port, timeout=PROBE_TIMEOUT)
    )
    seen: dict[str, str] = {}
    out: dict[str, Any] = {}
    try:
        for _ in range(2):
            for i in range(1, PROBE_USERS + 1):
                user = f"user-{i}"
                conn.request("GET", "/", headers={USER_HEADER: user})
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                backend = r.getheader(BACKEND_HEADER) or ""
                if r.status != 200 or body != BODY or not backend:
                    raise ProbeError(
                        f"user {user}: status {r.status}, body {body[:60]!r}, "
                        f"{BACKEND_HEADER} {backend!r}"
                    )
                if seen.setdefault(user, backend) != backend:
                    raise ProbeError(f"user {user} went to {seen[user]}, then to {backend}")
        if ctx is not None and isinstance(conn.sock, ssl.SSLSocket):
            cipher = conn.sock.cipher()
            out = {"version": conn.sock.version(), "cipher": cipher[0] if cipher else "-"}
    except (OSError, http.client.HTTPException) as e:
        raise ProbeError(f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()
    if len(set(seen.values())) < 2:
        raise ProbeError(f"all {PROBE_USERS} probe users went to one backend")
    if ctx is not None:
        status = _http10_status(port, ctx)
        if status != 200:
            raise ProbeError(f"an HTTP/1.0 GET without a key was answered {status}")
    return out


def _http10_status(port: int, ctx: ssl.SSLContext) -> int:
    with (
        socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=LOOPBACK) as s,
    ):
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


# -- one measured run ------------------------------------------------------------------------


def wrk_argv(url: str, duration: float, connections: int, script: Path, users: int) -> list[str]:
    return [
        "wrk",
        f"-t{THREADS}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        str(users),
        str(SEED),
    ]


def run_wrk(
    url: str, duration: float, connections: int, script: Path, users: int, server: Server
) -> dict[str, Any]:
    argv = wrk_argv(url, duration, connections, script, users)
    meter = CpuMeter(server.proc.pid)
    meter.start()
    try:
        r = run_argv(argv, duration)
    finally:
        used = meter.stop()
    return {
        "rate": r.rps,
        "count": r.requests,
        "seconds": r.duration_s,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "non_2xx": r.non_2xx,
        "socket_errors": r.socket_errors,
        **per_request_us(used, r.requests),
    }


def s_time_argv(port: int, seconds: int) -> list[str]:
    return [
        "openssl",
        "s_time",
        "-connect",
        f"{LOOPBACK}:{port}",
        "-new",
        "-time",
        str(seconds),
        "-www",
        "/",
    ]


def parse_s_time(output: str) -> tuple[int, int]:
    """(connections, bytes read) of `s_time -new`'s first figures line."""
    found = S_TIME_LINE.search(output)
    if found is None:
        raise WrkError(f"no figures in openssl s_time's output: {output.strip()[-300:]}")
    return int(found.group(1)), int(found.group(2))


def run_handshakes(port: int, duration: float, clients: int, server: Server) -> dict[str, Any]:
    """`clients` s_time processes at once, each making full handshakes (a new session each
    time) for `duration` seconds; each process's connections over its own wall time, summed.
    s_time stops at a whole-second boundary of the wall clock, so its own time is not used."""
    seconds = max(1, round(duration))
    meter = CpuMeter(server.proc.pid)
    meter.start()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            s_time_argv(port, seconds),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(clients)
    ]
    ended: dict[int, float] = {}
    deadline = started + seconds + EXIT_GRACE
    try:
        # each process's own end (they need not stop in the same second)
        while len(ended) < len(procs) and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - started
            time.sleep(S_TIME_POLL)
        outputs, elapsed, failed = [], [], []
        for i, p in enumerate(procs):
            if i not in ended:
                failed.append(f"ran past {seconds + EXIT_GRACE:g}s")
                continue
            out = p.stdout.read() if p.stdout is not None else ""
            outputs.append(out)
            elapsed.append(ended[i])
            if p.returncode != 0:
                failed.append(f"exit {p.returncode}: {out.strip()[-200:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
    used = meter.stop()
    if failed:
        raise WrkError("openssl s_time failed: " + "; ".join(failed))
    counts = [parse_s_time(o) for o in outputs]
    total = sum(c for c, _ in counts)
    return {
        "rate": sum(c / t for (c, _), t in zip(counts, elapsed)),
        "count": total,
        "seconds": max(elapsed),
        "p50_ms": None,
        "p99_ms": None,
        "non_2xx": 0,
        "socket_errors": 0,
        "clients": clients,
        "bytes_per_connection": sum(b for _, b in counts) / total if total else 0,
        **per_request_us(used, total),
    }


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One proxy's listener: where to send a measure's load."""

    target: str
    server: Server
    plain_port: int
    tls_ports: dict[str, int]


def _row_key(mode: str, key: str | None, target: str) -> str:
    return f"{mode}/{key or '-'}/{target}"


def measure(
    endpoint: Endpoint, mode: str, key: str | None, plan: Plan, duration: float
) -> dict[str, Any]:
    if mode == PLAIN:
        return run_wrk(
            f"http://{LOOPBACK}:{endpoint.plain_port}/",
            duration,
            plan.connections,
            USERS_SCRIPT,
            plan.users,
            endpoint.server,
        )
    port = endpoint.tls_ports[key or ECDSA]
    if mode == HANDSHAKE:
        return run_handshakes(port, duration, plan.handshake_clients, endpoint.server)
    script = RECONNECT_SCRIPT if mode == RECONNECT else USERS_SCRIPT
    return run_wrk(
        f"https://{LOOPBACK}:{port}/",
        duration,
        plan.connections,
        script,
        plan.users,
        endpoint.server,
    )


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "rate": median("rate"),
        "rounds": [r["rate"] for r in runs],
        "cpu_us": median("cpu_us"),
        "p50_ms": median("p50_ms"),
        "p99_ms": median("p99_ms"),
        "count": sum(r["count"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Row `a` over row `b`, round by round (the two measured in the same round, back to
    back), and the median of those ratios: on a shared machine a slow moment hits both of a
    pair, while the ratio of two medians can pair a fast round of one with a slow round of
    the other. None when either was not measured."""
    if not a or not b or not a.get("summary") or not b.get("summary"):
        return None
    by_round = {r["round"]: r for r in b["runs"]}
    pairs = [(r, by_round[r["round"]]) for r in a["runs"] if r["round"] in by_round]
    rates = [x for x in (_ratio(r["rate"], o["rate"]) for r, o in pairs) if x is not None]
    cpus = [
        x for x in (_ratio(r.get("cpu_us"), o.get("cpu_us")) for r, o in pairs) if x is not None
    ]
    return {
        "rate_ratio": statistics.median(rates) if rates else None,
        "cpu_ratio": statistics.median(cpus) if cpus else None,
        "round_ratios": rates,
        "ratio_of_medians": _ratio(a["summary"]["rate"], b["summary"]["rate"]),
    }


def compare(
    rows: dict[str, dict[str, Any]], measures: Sequence[tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """stickyproxy over NGINX for each measure (`paired`)."""
    out = []
    for mode, key in measures:
        pair = paired(
            rows.get(_row_key(mode, key, STICKYPROXY)), rows.get(_row_key(mode, key, NGINX))
        )
        if pair is not None:
            out.append({"mode": mode, "key": key, **pair})
    return out


def tls_cost(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each proxy's keep-alive TLS rate over its plain rate (median of the rounds' ratios)."""
    out = {}
    for target in (NGINX, STICKYPROXY):
        pair = paired(
            rows.get(_row_key(KEEPALIVE, ECDSA, target)), rows.get(_row_key(PLAIN, None, target))
        )
        out[target] = pair["rate_ratio"] if pair else None
    return out


def plain_over_pre_tls(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Plain HTTP: the current stickyproxy over the one before TLS (`paired`); None when the
    earlier one was not measured."""
    return paired(
        rows.get(_row_key(PLAIN, None, STICKYPROXY)), rows.get(_row_key(PLAIN, None, PRE_TLS))
    )


def _describe(r: dict[str, Any], unit: str) -> str:
    text = f"{r['rate']:,.0f} {unit}"
    if r.get("p99_ms") is not None:
        text += f" (p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms)"
    if r.get("cpu_us"):
        text += f", {r['cpu_us']:.0f} us CPU each"
    if r["non_2xx"] or r["socket_errors"]:
        text += f", {r['non_2xx']:,} non-2xx, {r['socket_errors']:,} socket errors"
    return text


def start_endpoints(
    workdir: Path,
    stack: contextlib.ExitStack,
    certs: dict[str, CertFiles],
    backend_ports: Sequence[int],
    with_nginx: bool,
    progress: Callable[[str], None],
    pre_tls: Path | None = None,
) -> tuple[list[Endpoint], dict[str, Any]]:
    """NGINX (one process, every listener) and stickyproxy (a process per listener), all
    started at once, then probed. Returns the endpoints and what each listener negotiated."""
    keys = list(certs)
    spawned: list[tuple[Server, list[int]]] = []
    endpoints = []
    configs: dict[str, str] = {}
    if with_nginx:
        plain, *tls = free_ports(1 + len(keys))
        launch = nginx_tls_launch(workdir, plain, dict(zip(keys, tls)), certs, backend_ports)
        launch.write()
        configs[NGINX] = launch.config
        server = spawn_server("nginx-tls", launch.argv, workdir, stack, launch.env)
        spawned.append((server, [plain, *tls]))
        endpoints.append(Endpoint(NGINX, server, plain, dict(zip(keys, tls))))
    ports = free_ports(1 + len(keys))
    servers: dict[str | None, Server] = {}
    for cert_name, port in zip([None, *keys], ports):
        name = cert_name or PLAIN
        launch = stickyproxy_tls_launch(
            workdir, port, backend_ports, certs[cert_name] if cert_name else None, name
        )
        launch.write()
        configs[f"{STICKYPROXY}-{name}"] = launch.config
        servers[cert_name] = spawn_server(
            f"stickyproxy-{name}", launch.argv, workdir, stack, launch.env
        )
        spawned.append((servers[cert_name], [port]))
    if pre_tls is not None:
        (old_port,) = free_ports(1)
        launch = stickyproxy_tls_launch(workdir, old_port, backend_ports, None, "pre-tls", pre_tls)
        launch.write()
        configs[PRE_TLS] = launch.config
        old = spawn_server(PRE_TLS, launch.argv, workdir, stack, launch.env)
        spawned.append((old, [old_port]))
        endpoints.append(Endpoint(PRE_TLS, old, old_port, {}))
    for server, server_ports in spawned:
        try:
            wait_until_accepting(server, server_ports, 15.0)
        except StartError as e:
            raise StartError(f"{server.name}: {e}") from None
    # One endpoint per stickyproxy listener, each its own process (CPU is measured per process);
    # plain_port 0: no plain listener.
    endpoints += [
        Endpoint(STICKYPROXY, servers[k], 0 if k else p, {k: p} if k else {})
        for k, p in zip([None, *keys], ports)
    ]
    negotiated: dict[str, Any] = {"configs": configs}
    for ep in endpoints:
        if ep.plain_port:
            probe(ep.plain_port, None)
        for k, p in ep.tls_ports.items():
            negotiated[f"{ep.target}/{k}"] = probe(p, client_context(certs[k].ca))
    progress(
        "listeners answer and keep each user on one backend: "
        + ", ".join(
            f"{k} {v['version']} {v['cipher']}" for k, v in negotiated.items() if k != "configs"
        )
    )
    return endpoints, negotiated


def _for(endpoints: Sequence[Endpoint], target: str, mode: str, key: str | None) -> Endpoint | None:
    for ep in endpoints:
        if ep.target == target and (ep.plain_port if mode == PLAIN else key in ep.tls_ports):
            return ep
    return None


def run(
    plan: Plan,
    tools: dict[str, bool],
    progress: Callable[[str], None] = default_progress,
    images_dir: Path | None = None,
) -> dict[str, Any]:
    """The benchmark: results as a dict (rows by measure and target, comparisons, skips)."""
    skipped: list[str] = []
    measures = [
        m
        for m in plan.measures
        if (m[0] == HANDSHAKE and tools["openssl"]) or (m[0] != HANDSHAKE and tools["wrk"])
    ]
    if len(measures) < len(plan.measures):
        skipped.append(
            "wrk or openssl is missing: "
            + ", ".join(f"{m}/{k or '-'}" for m, k in plan.measures if (m, k) not in measures)
        )
    if not tools["nginx"]:
        skipped.append("nginx is missing: stickyproxy alone, Python backends")
    keys = list(dict.fromkeys(k for _, k in measures if k))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.monotonic()
    rows: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-tls-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        certs = make_certificates(workdir, keys or [ECDSA])
        pre_tls, why_not = pre_tls_tree(workdir) if tools["wrk"] else (None, "no wrk")
        if why_not:
            skipped.append(f"{PRE_TLS}: {why_not}")
        backend_ports, _, _ = start_backends(
            workdir, stack, NGINX_BACKENDS if tools["nginx"] else PYTHON_BACKENDS
        )
        endpoints, negotiated = start_endpoints(
            workdir, stack, certs, backend_ports, tools["nginx"], progress, pre_tls
        )
        targets = [t for t in TARGETS if any(ep.target == t for ep in endpoints)]
        if plan.warmup and tools["wrk"]:
            for ep in endpoints:
                mode, key = (KEEPALIVE, next(iter(ep.tls_ports))) if ep.tls_ports else (PLAIN, None)
                measure(ep, mode, key, plan, plan.warmup)
            progress(f"warmed up every listener ({plan.warmup:g}s each)")
        for round_no in range(1, plan.rounds + 1):
            # the two proxies back to back, the first of each pair alternating by round
            order = targets if round_no % 2 else targets[::-1]
            for mode, key in measures:
                for target in order:
                    at = _for(endpoints, target, mode, key)
                    if at is None:
                        continue
                    if not at.server.running:
                        raise RuntimeError(f"{target} exited: {at.server.describe_exit()}")
                    r = measure(at, mode, key, plan, plan.duration)
                    row = rows.setdefault(
                        _row_key(mode, key, target),
                        {"mode": mode, "key": key, "target": target, "runs": []},
                    )
                    row["runs"].append({"round": round_no, **r})
                    label = f"{mode}{'/' + key if key else ''}"
                    progress(
                        f"round {round_no}/{plan.rounds} {label:16} {target:11} "
                        f"{_describe(r, UNITS[mode])}"
                    )
    for row in rows.values():
        row["summary"] = summarize(row["runs"])
    result: dict[str, Any] = {
        "benchmark": "tls",
        "started_at": started,
        "seconds": round(time.monotonic() - t0, 1),
        "settings": {
            "duration_s": plan.duration,
            "rounds": plan.rounds,
            "warmup_s": plan.warmup,
            "connections": plan.connections,
            "threads": THREADS,
            "users": plan.users,
            "handshake_clients": plan.handshake_clients,
            "smoke": plan.smoke,
            "workers": 1,
            "measures": [list(m) for m in measures],
        },
        "certificates": {k: KEY_NAMES[k] for k in keys},
        "negotiated": {k: v for k, v in negotiated.items() if k != "configs"},
        "configs": negotiated["configs"],
        "tools": {
            "stickyproxy": stickyproxy_version(),
            "nginx": tool_version(["nginx", "-v"]) if tools["nginx"] else "missing",
            "wrk": tool_version(["wrk", "-v"]) if tools["wrk"] else "missing",
            "openssl": tool_version(["openssl", "version"]) if tools["openssl"] else "missing",
            "python_ssl": ssl.OPENSSL_VERSION,
        },
        "rows": list(rows.values()),
        "comparisons": compare(rows, measures),
        "tls_over_plain": tls_cost(rows),
        "plain_over_pre_tls": plain_over_pre_tls(rows),
        "pre_tls_commit": PRE_TLS_COMMIT,
        "skipped": skipped,
    }
    if images_dir is not None:
        try:
            from . import plots
        except ImportError as e:
            progress(f"tls: no chart ({e}; pip install -e '.[bench]')")
        else:
            drawn = plots.tls(images_dir / "tls.png", result)
            result["chart"] = str(drawn) if drawn else None
    return result


def available_tools() -> dict[str, bool]:
    return {name: shutil.which(name) is not None for name in ("nginx", "wrk", "openssl")}


def check(smoke: bool, tools: dict[str, bool]) -> None:
    """Raise Skip when this machine cannot run the benchmark (in full runs, any tool missing)."""
    try:
        import trustme  # noqa: F401
    except ImportError:
        raise Skip("trustme is not installed (pip install trustme)") from None
    missing = sorted(name for name, ok in tools.items() if not ok)
    if missing and not smoke:
        raise Skip(f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})")
    if not tools["wrk"] and not tools["openssl"]:
        raise Skip("neither wrk nor openssl is installed: nothing to measure")


def run_suite(settings: Any, skip: type[Exception]) -> dict[str, Any]:
    """For bench/__main__.py: settings has ``smoke`` and ``images_dir``; `skip` is the
    suite's exception for a benchmark this machine cannot run."""
    tools = available_tools()
    try:
        check(settings.smoke, tools)
    except Skip as e:
        raise skip(str(e)) from None
    result = run(make_plan(settings.smoke), tools, default_progress, settings.images_dir)
    for line in result["skipped"]:
        default_progress(f"tls: {line}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 s per run, 1 round (about 20 s)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for tls.json and tls.png (default bench/results[/smoke])",
    )
    args = p.parse_args(argv)
    tools = available_tools()
    try:
        check(args.smoke, tools)
    except Skip as e:
        print(f"tls: skipped: {e}", file=sys.stderr)
        return 2
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    result = run(make_plan(args.smoke), tools, default_progress, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tls.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    default_progress(f"tls: {out / 'tls.json'}, chart {result.get('chart')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
